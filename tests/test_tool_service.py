"""The tool service over real gRPC: servers in this process on a free port, and servers started as their own process
with `python -m longhaul.actors.tool_service`. Every answer is checked against the same world called directly."""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from prometheus_client import REGISTRY

from longhaul.actors.search_world import SearchWorld
from longhaul.actors.tool_service import (
    MAX_ANSWER_CHARS,
    MAX_ID_CHARS,
    MAX_LIST_LIMIT,
    MAX_QUERY_CHARS,
    MAX_READ_DOC_IDS,
    MAX_TOP_K,
    TRUNCATION_MARKER,
    Page,
    TaskInfo,
    TaskPage,
    ToolClient,
    ToolError,
    ToolServerProcess,
    ToolServicer,
    start_server,
)
from longhaul.config import ToolServiceConfig, WorldConfig
from longhaul.net import free_port
from longhaul.v1 import tools_pb2 as pb
from longhaul.v1 import tools_pb2_grpc as pb_grpc

WORLD = WorldConfig(num_entities=60, num_tasks=100)


@pytest.fixture(scope="module")
def world() -> SearchWorld:
    return SearchWorld.generate(WORLD)


@pytest.fixture(scope="module")
def server_process() -> Iterator[ToolServerProcess]:
    """One tool server process with default settings, shared by the tests that only read from it."""
    process = ToolServerProcess(ToolServiceConfig(), WORLD).start()
    yield process
    assert process.stop() == 0


def run(coro: Awaitable, timeout_s: float = 30) -> object:
    """Run a test body on a fresh event loop; a hang fails the test instead of the suite."""

    async def bounded():
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def tool_server(world: SearchWorld, port: int = 0, **settings) -> AsyncIterator[tuple[str, ToolServicer]]:
    """A tool server in this event loop; yields its address and servicer."""
    servicer = ToolServicer(world, ToolServiceConfig(**settings))
    server, port = await start_server(servicer, port)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)
        servicer.close()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def queries(world: SearchWorld) -> list[str]:
    """Queries with hits in the world (task questions), a one-word one, and one that matches nothing."""
    return [task.question for task in world.tasks()[:10]] + [world.tasks()[0].question.split()[0], "zzzqqq xxyyzz"]


def task_info(task) -> TaskInfo:
    return TaskInfo(task_id=task.task_id, question=task.question, hops=task.hops, split=task.split)


# ------------------------------------------------------------------------------------------------ answers


def test_search_returns_exactly_the_worlds_hits(world: SearchWorld):
    async def body():
        async with tool_server(world, search_top_k=3) as (address, _), ToolClient(address) as client:
            for query in queries(world):
                assert await client.search(query) == world.search(query, 3)
                for top_k in (1, 7, MAX_TOP_K):
                    assert await client.search(query, top_k) == world.search(query, top_k)

    run(body())
    assert any(world.search(query, 3) for query in queries(world)), "the queries should hit some documents"
    assert world.search("zzzqqq xxyyzz", 3) == []


def test_open_returns_the_worlds_page_cut_at_max_page_chars_with_a_marker(world: SearchWorld):
    titles = {hit.doc_id: hit.title for query in queries(world) for hit in world.search(query, 10)}
    doc_ids = sorted(titles)
    pages = {doc_id: world.open(doc_id) for doc_id in doc_ids}
    # The median page length as the cut: some pages come back whole, some cut.
    max_chars = max(64, sorted(len(page) for page in pages.values())[len(pages) // 2])

    async def body():
        async with tool_server(world, max_page_chars=max_chars) as (address, _), ToolClient(address) as client:
            return {doc_id: await client.open(doc_id) for doc_id in doc_ids}

    opened = run(body())
    for doc_id, page in pages.items():
        if len(page) <= max_chars:
            expected = Page(doc_id=doc_id, text=page, truncated=False, total_chars=len(page), title=titles[doc_id])
        else:
            expected = Page(doc_id=doc_id, text=page[:max_chars] + TRUNCATION_MARKER.format(
                shown=max_chars, total=len(page)), truncated=True, total_chars=len(page), title=titles[doc_id])
        assert opened[doc_id] == expected
    assert {p.truncated for p in opened.values()} == {True, False}


def test_answer_returns_the_worlds_grade(world: SearchWorld):
    tasks = world.tasks()[:20]
    attempts = [(task.task_id, answer) for task in tasks
                for answer in (task.answer, task.answer.upper(), f"{task.answer} and more", "wrong", "")]

    async def body():
        async with tool_server(world) as (address, _), ToolClient(address) as client:
            return [await client.answer(task_id, answer) for task_id, answer in attempts]

    assert run(body()) == [world.grade(task_id, answer) for task_id, answer in attempts]
    assert world.grade(tasks[0].task_id, tasks[0].answer).exact_match == 1.0


def test_answer_grades_the_evidence_among_the_pages_read(world: SearchWorld):
    task = next(t for t in world.tasks() if t.hops >= 2)
    read = [task.evidence_doc_ids[0], "d-0-0", task.evidence_doc_ids[0]]

    async def body():
        async with tool_server(world) as (address, _), ToolClient(address) as client:
            return await client.answer(task.task_id, task.answer, read)

    assert run(body()) == world.grade(task.task_id, task.answer, read)
    assert run(body()).evidence_recall == 1 / task.hops


def test_list_tasks_pages_through_every_task_in_order(world: SearchWorld):
    async def body():
        async with tool_server(world) as (address, _), ToolClient(address) as client:
            for split in (None, "train", "test"):
                expected = [task_info(task) for task in world.tasks(split)]
                listed, offset, pages = [], 0, 0
                while offset is not None:
                    page = await client.list_tasks(split, offset, limit=7)
                    assert page.total == len(expected)
                    listed += page.tasks
                    offset, pages = page.next_offset, pages + 1
                assert listed == expected
                assert pages == max(1, -(-len(expected) // 7))
                assert await client.all_tasks(split) == expected
            past_end = await client.list_tasks(None, offset=len(world.tasks()), limit=5)
            assert (past_end.tasks, past_end.total, past_end.next_offset) == ([], len(world.tasks()), None)

    run(body())
    assert len(world.tasks("train")) + len(world.tasks("test")) == len(world.tasks()) == WORLD.num_tasks


def test_list_tasks_never_sends_answers(world: SearchWorld):
    # The schema has no field that could carry an answer...
    assert [f.name for f in pb.TaskInfo.DESCRIPTOR.fields] == ["task_id", "question", "hops", "split"]
    assert [f.name for f in pb.ListTasksResponse.DESCRIPTOR.fields] == ["tasks", "total"]

    # ...and the server sets no more than that schema: read the raw response, bypassing the client.
    async def body():
        async with tool_server(world) as (address, _), grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ToolServiceStub(channel)
            return await stub.ListTasks(pb.ListTasksRequest(offset=0, limit=MAX_LIST_LIMIT), timeout=10)

    response = run(body())
    assert len(response.tasks) == len(world.tasks())
    for message, task in zip(response.tasks, world.tasks(), strict=True):
        assert {field.name for field, _ in message.ListFields()} <= {"task_id", "question", "hops", "split"}
        assert (message.task_id, message.question, message.hops, message.split) == (
            task.task_id, task.question, task.hops, task.split)


# ------------------------------------------------------------------------------------------------ errors

INVALID_CALLS: list[tuple[str, Callable[[ToolClient, str], Awaitable], str]] = [
    ("empty query", lambda c, t: c.search(""), "query"),
    ("blank query", lambda c, t: c.search("  \n\t "), "query"),
    ("oversized query", lambda c, t: c.search("word " * (MAX_QUERY_CHARS // 5 + 1)), "query"),
    ("query not a string", lambda c, t: c.search(42), "query"),
    ("top_k zero", lambda c, t: c.search("anything", 0), "top_k"),
    ("top_k negative", lambda c, t: c.search("anything", -3), "top_k"),
    ("top_k over the cap", lambda c, t: c.search("anything", MAX_TOP_K + 1), "top_k"),
    ("top_k past int32", lambda c, t: c.search("anything", 2**40), "top_k"),
    ("empty doc_id", lambda c, t: c.open(""), "doc_id"),
    ("doc_id with a space", lambda c, t: c.open("doc 1"), "doc_id"),
    ("doc_id with quotes", lambda c, t: c.open('"doc-1"'), "doc_id"),
    ("oversized doc_id", lambda c, t: c.open("d" * (MAX_ID_CHARS + 1)), "doc_id"),
    ("empty task_id", lambda c, t: c.answer("", "x"), "task_id"),
    ("malformed task_id", lambda c, t: c.answer("task?id=1", "x"), "task_id"),
    ("oversized answer", lambda c, t: c.answer(t, "a" * (MAX_ANSWER_CHARS + 1)), "answer"),
    ("too many read_doc_ids", lambda c, t: c.answer(t, "x", ["d1"] * (MAX_READ_DOC_IDS + 1)), "read_doc_ids"),
    ("malformed read_doc_id", lambda c, t: c.answer(t, "x", ["d1", "doc 1"]), "read_doc_ids"),
    ("read_doc_id not a string", lambda c, t: c.answer(t, "x", [7]), "read_doc_ids"),
    ("read_doc_ids a string", lambda c, t: c.answer(t, "x", "d1"), "read_doc_ids"),
    ("unknown split", lambda c, t: c.list_tasks("dev"), "split"),
    ("negative offset", lambda c, t: c.list_tasks(None, -1, 5), "offset"),
    ("zero limit", lambda c, t: c.list_tasks(None, 0, 0), "limit"),
    ("limit over the cap", lambda c, t: c.list_tasks(None, 0, MAX_LIST_LIMIT + 1), "limit"),
]


@pytest.mark.parametrize(("call", "field"), [(call, field) for _, call, field in INVALID_CALLS],
                         ids=[name for name, _, _ in INVALID_CALLS])
def test_invalid_request_is_invalid_argument_naming_the_field(world: SearchWorld, call, field: str):
    async def body():
        async with tool_server(world) as (address, _), ToolClient(address) as client:
            with pytest.raises(ToolError) as caught:
                await call(client, world.tasks()[0].task_id)
            return caught.value

    error = run(body())
    assert (error.kind, error.field) == ("invalid_argument", field)
    assert f"{field}: " in str(error)


def test_bounds_themselves_are_accepted(world: SearchWorld):
    task = world.tasks()[0]

    async def body():
        async with tool_server(world) as (address, _), ToolClient(address) as client:
            assert len(await client.search("a" * MAX_QUERY_CHARS, 1)) <= 1
            assert await client.answer(task.task_id, "a" * MAX_ANSWER_CHARS) == world.grade(task.task_id,
                                                                                              "a" * MAX_ANSWER_CHARS)
            read = list(task.evidence_doc_ids) * MAX_READ_DOC_IDS
            read = read[:MAX_READ_DOC_IDS]
            assert (await client.answer(task.task_id, "x", read)).evidence_recall == 1.0
            with pytest.raises(ToolError) as caught:
                await client.open("d" * MAX_ID_CHARS)
            assert caught.value.kind == "not_found"

    run(body())


def test_unknown_document_and_task_are_not_found_and_counted(world: SearchWorld):
    counters = [("longhaul_tool_server_requests_total", {"tool": "open", "code": "NOT_FOUND"}),
                ("longhaul_tool_server_requests_total", {"tool": "answer", "code": "NOT_FOUND"}),
                ("longhaul_tool_calls_total", {"tool": "open", "status": "not_found"}),
                ("longhaul_tool_calls_total", {"tool": "answer", "status": "not_found"})]
    before = [metric(name, **labels) for name, labels in counters]

    async def body():
        async with tool_server(world) as (address, _), ToolClient(address) as client:
            errors = []
            for call in (client.open("no-such-doc"), client.answer("no-such-task", "x")):
                with pytest.raises(ToolError) as caught:
                    await call
                errors.append(caught.value)
            return errors

    opened, answered = run(body())
    assert (opened.kind, opened.field, answered.kind, answered.field) == ("not_found", "doc_id", "not_found", "task_id")
    assert "'no-such-doc'" in str(opened) and str(opened).startswith("open: doc_id: ")
    assert "'no-such-task'" in str(answered) and str(answered).startswith("answer: task_id: ")
    assert [metric(name, **labels) - b for (name, labels), b in zip(counters, before, strict=True)] == [1, 1, 1, 1]


def test_a_server_without_the_tool_service_is_an_internal_error():
    """A server that does not implement these RPCs (UNIMPLEMENTED) is a deployment bug, not a transient error."""

    async def body():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with ToolClient(f"127.0.0.1:{port}", ToolServiceConfig(max_attempts=3)) as client:
                with pytest.raises(ToolError) as caught:
                    await client.search("anything")
                return caught.value
        finally:
            await server.stop(None)

    error = run(body())
    assert (error.kind, error.attempts) == ("internal", 1)
    assert "UNIMPLEMENTED" in str(error)


# ------------------------------------------------------------------------------------------------ deadlines, retries


def test_server_slower_than_the_deadline_is_a_timeout_at_the_deadline(world: SearchWorld):
    async def body():
        async with tool_server(world, simulated_latency_s=3.0) as (address, servicer), \
                ToolClient(address, ToolServiceConfig(deadline_s=0.5)) as client:
            started = time.monotonic()
            with pytest.raises(ToolError) as caught:
                await client.search("anything")
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.05)  # the server sees the cancellation shortly after
            return caught.value, elapsed, servicer.in_flight

    error, elapsed, left_in_flight = run(body())
    assert (error.kind, error.attempts) == ("timeout", 1)
    assert "timed out" in str(error) and "0.5 s" in str(error)
    assert 0.5 <= elapsed < 0.5 + 0.2
    assert left_in_flight == 0  # the server cancelled the call it could no longer answer


def test_deadline_covers_the_wait_for_a_concurrency_slot(world: SearchWorld):
    async def body():
        async with tool_server(world, simulated_latency_s=0.35) as (address, _), \
                ToolClient(address, ToolServiceConfig(deadline_s=0.5, max_concurrency=1)) as client:
            query = world.tasks()[0].question

            async def timed():
                started = time.monotonic()
                try:
                    return await client.search(query), time.monotonic() - started
                except ToolError as exc:
                    return exc, time.monotonic() - started

            return await asyncio.gather(timed(), timed()), query

    ((first, first_s), (second, second_s)), query = run(body())
    assert first == world.search(query, 5) and first_s < 0.5
    # The second call waited 0.35 s for the slot, leaving 0.15 s for a call that takes 0.35 s.
    assert isinstance(second, ToolError) and second.kind == "timeout"
    assert 0.5 <= second_s < 0.5 + 0.2


def test_unavailable_is_retried_until_the_server_comes_up(world: SearchWorld):
    port = free_port()
    config = ToolServiceConfig(max_attempts=6, deadline_s=10)
    query = world.tasks()[0].question

    async def body():
        before = metric("longhaul_tool_call_attempts_total", tool="search", code="UNAVAILABLE")
        async with ToolClient(f"127.0.0.1:{port}", config) as client:
            call = asyncio.create_task(client.search(query))
            while metric("longhaul_tool_call_attempts_total", tool="search", code="UNAVAILABLE") == before:
                await asyncio.sleep(0.001)  # until the first attempt has failed: nothing listens yet
            assert not call.done()
            async with tool_server(world, port):
                hits = await call
        return hits, metric("longhaul_tool_call_attempts_total", tool="search", code="UNAVAILABLE") - before

    hits, failed_attempts = run(body())
    assert hits == world.search(query, 5)
    assert 1 <= failed_attempts <= config.max_attempts - 1


def test_no_server_is_unavailable_after_exactly_max_attempts():
    config = ToolServiceConfig(max_attempts=4, deadline_s=10)
    labels = {"tool": "open"}

    async def body():
        before = (metric("longhaul_tool_call_attempts_total", **labels, code="UNAVAILABLE"),
                  metric("longhaul_tool_calls_total", **labels, status="unavailable"))
        async with ToolClient(f"127.0.0.1:{free_port()}", config) as client:
            started = time.monotonic()
            with pytest.raises(ToolError) as caught:
                await client.open("doc-1")
            elapsed = time.monotonic() - started
        after = (metric("longhaul_tool_call_attempts_total", **labels, code="UNAVAILABLE"),
                 metric("longhaul_tool_calls_total", **labels, status="unavailable"))
        return caught.value, elapsed, after[0] - before[0], after[1] - before[1]

    error, elapsed, attempts, calls = run(body())
    assert (error.kind, error.attempts, attempts, calls) == ("unavailable", 4, 4, 1)
    assert "after 4 attempt(s)" in str(error)
    # Three backoffs of at least 0.05, 0.1 and 0.2 s, at most 0.1, 0.2 and 0.4 s (plus connection attempts).
    assert 0.35 <= elapsed < 0.7 + 0.5


def test_client_keeps_at_most_max_concurrency_calls_in_flight(world: SearchWorld):
    async def body():
        async with tool_server(world, simulated_latency_s=0.2) as (address, servicer), \
                ToolClient(address, ToolServiceConfig(max_concurrency=4)) as client:
            started = time.monotonic()
            hits = await asyncio.gather(*(client.search(query) for query in queries(world)[:10] * 2))
            return hits, time.monotonic() - started, servicer.max_in_flight

    hits, elapsed, max_in_flight = run(body())
    assert hits == [world.search(query, 5) for query in queries(world)[:10] * 2]
    assert max_in_flight == 4
    assert elapsed >= 20 / 4 * 0.2


# ------------------------------------------------------------------------------------------------ as a process


def mixed_calls(world: SearchWorld, n: int, seed: int = 0) -> list[tuple[Callable[[ToolClient], Awaitable], object]]:
    """`n` calls across the four tools, each with the answer the world gives directly."""
    rng = random.Random(seed)
    tasks = world.tasks()
    doc_ids = sorted({hit.doc_id for query in queries(world) for hit in world.search(query, 10)})
    calls = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.4:
            query, top_k = rng.choice(queries(world)), rng.randint(1, 10)
            calls.append((lambda c, q=query, k=top_k: c.search(q, k), world.search(query, top_k)))
        elif roll < 0.7:
            doc_id = rng.choice(doc_ids)
            page = world.open(doc_id)
            calls.append((lambda c, d=doc_id: c.open(d), (page[:2000], len(page))))
        elif roll < 0.9:
            task = rng.choice(tasks)
            answer = rng.choice([task.answer, "wrong"])
            calls.append((lambda c, t=task.task_id, a=answer: c.answer(t, a), world.grade(task.task_id, answer)))
        else:
            offset, limit = rng.randint(0, len(tasks)), rng.randint(1, 20)
            calls.append((lambda c, o=offset, n=limit: c.list_tasks(None, o, n),
                          [task_info(task) for task in tasks[offset:offset + limit]]))
    return calls


def outcome(result: object) -> object:
    """The part of a client result that `mixed_calls` predicts."""
    if isinstance(result, Page):
        return result.text[:2000], result.total_chars
    if isinstance(result, TaskPage):
        return result.tasks
    return result


async def call_all(client: ToolClient, calls) -> list[tuple[object, float]]:
    """Make every call at once; each yields (result or ToolError, seconds). Any other exception propagates."""

    async def one(call):
        started = time.monotonic()
        try:
            result = outcome(await call(client))
        except ToolError as exc:
            result = exc
        return result, time.monotonic() - started

    return await asyncio.gather(*(one(call) for call, _ in calls))


def test_server_process_gives_the_worlds_answers(world: SearchWorld, server_process: ToolServerProcess):
    """A world generated in another process from the same config answers identically."""
    calls = mixed_calls(world, 200, seed=1)

    async def body():
        async with ToolClient(server_process.address) as client:
            return [outcome(await call(client)) for call, _ in calls]

    assert run(body()) == [expected for _, expected in calls]


@pytest.mark.slow
def test_server_process_answers_every_one_of_1000_concurrent_calls(world: SearchWorld,
                                                                  server_process: ToolServerProcess):
    calls = mixed_calls(world, 1000)

    async def body():
        async with ToolClient(server_process.address) as client:
            return await call_all(client, calls)

    results = run(body(), timeout_s=60)
    assert [result for result, _ in results] == [expected for _, expected in calls]


@pytest.mark.slow
def test_server_process_under_latency_near_the_deadline_answers_or_times_out_cleanly(world: SearchWorld):
    latency_s = 0.45
    calls = mixed_calls(world, 1000, seed=2)
    # Half the calls give up before the server can answer (every one must time out); half leave it 50 ms.
    too_short, near = ToolServiceConfig(deadline_s=0.4, max_concurrency=500), \
        ToolServiceConfig(deadline_s=0.5, max_concurrency=500)

    async def body(address: str):
        async with ToolClient(address, too_short) as hurried, ToolClient(address, near) as patient:
            started = time.monotonic()
            results = await asyncio.gather(call_all(hurried, calls[:500]), call_all(patient, calls[500:]))
            return results, time.monotonic() - started

    with ToolServerProcess(ToolServiceConfig(simulated_latency_s=latency_s), WORLD) as process:
        (hurried, patient), elapsed = run(body(process.address), timeout_s=60)

    for result, seconds in hurried:
        assert isinstance(result, ToolError) and result.kind == "timeout", result
        assert 0.4 <= seconds < 0.4 + 1.0
    for (result, seconds), (_, expected) in zip(patient, calls[500:], strict=True):
        assert result == expected or (isinstance(result, ToolError) and result.kind == "timeout"), result
        assert seconds < 0.5 + 1.0
    assert elapsed < 0.5 + 2.0  # nothing waited on anything else past its deadline


@pytest.mark.slow
def test_server_process_drains_calls_in_flight_on_sigterm_and_exits_cleanly(world: SearchWorld):
    query = world.tasks()[0].question
    process = ToolServerProcess(ToolServiceConfig(simulated_latency_s=1.0, shutdown_grace_s=5), WORLD).start()

    async def body():
        async with ToolClient(process.address, ToolServiceConfig(max_attempts=1)) as client:
            in_flight = asyncio.create_task(client.search(query))
            await asyncio.sleep(0.3)  # the call is now waiting out its latency on the server
            exit_code = asyncio.create_task(asyncio.to_thread(process.stop))
            await asyncio.sleep(0.3)  # the server got SIGTERM and no longer accepts calls
            with pytest.raises(ToolError) as refused:
                await client.search(query)
            return await in_flight, refused.value, await exit_code

    try:
        hits, refused, exit_code = run(body())
    finally:
        process.kill()  # only if the test failed before stop()
    assert hits == world.search(query, 5)
    assert refused.kind == "unavailable"
    assert exit_code == 0


def test_server_process_refuses_an_invalid_config_naming_the_field():
    result = subprocess.run([sys.executable, "-m", "longhaul.actors.tool_service", "--set",
                             "tools.simulated_latency_s=-0.5"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "tools.simulated_latency_s: Input should be greater than or equal to 0" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_client_reaches_a_server_process_restarted_on_its_port(world: SearchWorld):
    process = ToolServerProcess(ToolServiceConfig(), WORLD).start()
    query = world.tasks()[0].question

    async def body():
        async with ToolClient(process.address, ToolServiceConfig(max_attempts=10, deadline_s=30)) as client, \
                ToolClient(process.address, ToolServiceConfig(max_attempts=1)) as probe:
            assert await client.search(query) == world.search(query, 5)
            assert await asyncio.to_thread(process.stop) == 0
            with pytest.raises(ToolError) as down:
                await probe.search(query)
            restart = asyncio.create_task(asyncio.to_thread(process.start))
            # Started while the server is still down: it retries until the new process listens.
            hits = await client.search(query)
            await restart
            return down.value, hits

    try:
        down, hits = run(body(), timeout_s=60)
    finally:
        process.stop()
    assert down.kind == "unavailable"
    assert hits == world.search(query, 5)
