"""The embedded redis-server: private, persistent, restartable; and the switch to a configured URL."""

from __future__ import annotations

import pytest
import redis

from longhaul.buffer.redis_server import EmbeddedRedis, connect, redis_for_run
from longhaul.config import RedisConfig


def test_embedded_server_listens_on_loopback_with_a_password_and_aof(tmp_path):
    with EmbeddedRedis(tmp_path, appendfsync="always") as server:
        client = connect(server.url)
        config = client.config_get("*")
        assert (config["bind"], config["appendonly"], config["appendfsync"]) == ("127.0.0.1", "yes", "always")
        assert config["maxmemory-policy"] == "noeviction"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        client.set("k", "v")
        client.close()
    assert (tmp_path / "longhaul.aof").stat().st_size > 0


def test_a_clean_stop_and_restart_on_the_same_directory_keeps_the_data(tmp_path):
    server = EmbeddedRedis(tmp_path, password="pw").start()
    connect(server.url).xadd("s", {"f": "v"})
    server.stop()
    assert server.pid is None
    server.start()
    assert connect(server.url).xlen("s") == 1
    server.stop()


def test_a_failed_start_reports_the_servers_own_error(tmp_path):
    server = EmbeddedRedis(tmp_path, appendfsync="sometimes")  # not a valid fsync policy
    with pytest.raises(RuntimeError, match="exited with code"):
        server.start()


def test_with_a_url_the_configured_server_is_used_and_nothing_is_started(redis_server, tmp_path):
    config = RedisConfig(url=redis_server.url, data_dir=tmp_path / "unused")
    with redis_for_run(config) as url:
        assert url == redis_server.url
        assert connect(url).ping()
    assert not (tmp_path / "unused").exists()


def test_an_unreachable_url_fails_with_what_to_check(redis_server):
    wrong_password = redis_server.url.replace(redis_server.password, "wrong")
    with pytest.raises(ConnectionError, match="check redis.url"), redis_for_run(RedisConfig(url=wrong_password)):
        pass


def test_without_a_url_an_embedded_server_runs_for_the_block(tmp_path):
    with redis_for_run(RedisConfig(data_dir=tmp_path)) as url:
        client = connect(url)
        assert client.ping()
    with pytest.raises(redis.ConnectionError):
        client.ping()
