"""Shared fixtures: one real embedded redis-server for the session, and a fresh run namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from longhaul.buffer.redis_server import EmbeddedRedis, connect
from longhaul.buffer.store import TrajectoryStore
from longhaul.config import BufferConfig, ModelConfig, WorldConfig

# A world small enough to build in a blink; its corpus trains the tiny model's tokenizer.
SMALL_WORLD = WorldConfig(num_entities=60, num_tasks=50, max_hops=8, test_fraction=0.1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny model (`longhaul make-model`'s recipe) on SMALL_WORLD's corpus, built once for every engine test."""
    from longhaul.actors.search_world import SearchWorld  # imported here: bm25s pulls numba into the process
    from longhaul.actors.tiny_model import make_tiny_model

    world = SearchWorld.generate(SMALL_WORLD)
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), ModelConfig(max_position_embeddings=16384),
                           world.corpus_texts(), world.doc_ids)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendfsync="everysec")
    with server:
        yield server


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = connect(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def run_name() -> str:
    """A run namespace of its own for each test, so tests sharing the server never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_store(redis_client: redis.Redis, run_name: str) -> Callable[..., TrajectoryStore]:
    """Build stores on the test's run namespace; pass a BufferConfig (or keyword overrides of one)."""

    def make(config: BufferConfig | None = None, **overrides) -> TrajectoryStore:
        config = config or BufferConfig()
        if overrides:
            config = config.model_copy(update=overrides)
        return TrajectoryStore(redis_client, run_name, config)

    return make
