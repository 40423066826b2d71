"""The one typed configuration of a longhaul run.

Every section is a pydantic model that rejects unknown keys, bounds its numbers and checks its cross-field rules
when it is built, so a bad config fails at load time with the field named, never mid-run. Defaults run the
embedded CPU default with no external service.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RedisConfig(_Section):
    """Where the replay buffer lives."""

    url: str | None = None
    """`redis://` or `rediss://` URL of an existing server (credentials in the URL). None starts an embedded
    redis-server on a free loopback port."""

    data_dir: Path = Path("runs/redis")
    """Embedded server only: directory for the append-only file. Restarting on the same directory recovers the data."""

    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    """Embedded server only: AOF fsync policy. `always` loses no acknowledged append even on power loss, at the cost
    of one fsync per write; `everysec` can lose up to about one second of appends on a machine crash (not on a
    process kill: the write reaches the kernel before the reply)."""

    password: str | None = None
    """Embedded server only: fixed password; None generates a random one per start."""

    startup_timeout_s: float = Field(default=30.0, gt=0)
    """Embedded server only: how long to wait for the server to answer PING (it replays the AOF first)."""

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {url!r}")
        return url


class CodecConfig(_Section):
    """Limits on one trajectory payload, enforced before and while decoding."""

    max_payload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Payloads larger than this are rejected unread (64 MiB ≈ 5M tokens)."""

    max_tokens: int = Field(default=4 * 1024 * 1024, ge=1)
    """Longest token sequence one trajectory may carry."""

    max_string_bytes: int = Field(default=4096, ge=16)
    """Longest id, env name or reward-part name."""


class RateLimiterConfig(_Section):
    """Samples-per-insert limiter with Reverb's semantics, shared by every actor and the learner through Redis.

    `samples` counts trajectories handed to training (fresh or replayed), `inserts` counts appends. Sampling waits
    until `min_size_to_sample` inserts; with `error_buffer` set, the two are then held within `error_buffer` of
    `samples_per_insert` × inserts."""

    samples_per_insert: float = Field(default=1.0, gt=0)
    """Target number of training uses per appended trajectory."""

    min_size_to_sample: int = Field(default=1, ge=1)
    """Inserts required before the first sample."""

    error_buffer: float | None = Field(default=None, gt=0)
    """Allowed deviation (in samples) from the target ratio. None (the default) enforces no ratio: sampling only
    waits for `min_size_to_sample` inserts, and appends are plain XADDs. The staleness admission rule already paces
    the actors; set a value to hold the learner to `samples_per_insert` as well."""

    @model_validator(mode="after")
    def _error_buffer_admits_progress(self) -> RateLimiterConfig:
        if self.error_buffer is None:
            return self
        # An insert moves inserts×spi − samples up by spi, a sample moves it down by 1. If the window
        # [offset − error_buffer, offset + error_buffer] is narrower than spi + 1, some value of that difference
        # admits neither: every actor and the learner would then block until their timeouts, forever.
        if 2 * self.error_buffer < self.samples_per_insert + 1:
            raise ValueError(
                f"error_buffer={self.error_buffer} must be at least (samples_per_insert + 1) / 2 = "
                f"{(self.samples_per_insert + 1) / 2}: a narrower window deadlocks inserts and samples together"
            )
        return self


class StalenessConfig(_Section):
    """How far behind the learner a trajectory's policy may be (DESIGN.md: buffer semantics)."""

    max_staleness: int = Field(default=4, ge=0)
    """Versions a trajectory may lag the learner. 0 is synchronous RL."""

    batch_size: int = Field(default=16, ge=1)
    """Trajectories per learner step, used by the admission rule
    admitted < (version + max_staleness + 1) × batch_size."""

    policy: Literal["drop", "downweight"] = "drop"
    """What training does with a trajectory older than `max_staleness` versions. Either way it is counted."""

    downweight: float = Field(default=0.5, gt=0, le=1)
    """Loss weight of an over-stale trajectory under `policy: downweight`."""


class HistoryConfig(_Section):
    """Replay history the scheduler draws reused rollouts from."""

    rounds: int = Field(default=4, ge=0)
    """L: how many recent learner rounds stay eligible for replay. 0 disables replay."""

    max_times_sampled: int = Field(default=2, ge=1)
    """A trajectory leaves the history once it has been trained on this many times (its first, fresh use included)."""


class BufferConfig(_Section):
    """The Redis Streams trajectory store."""

    codec: CodecConfig = CodecConfig()
    rate_limiter: RateLimiterConfig = RateLimiterConfig()
    staleness: StalenessConfig = StalenessConfig()
    history: HistoryConfig = HistoryConfig()

    claim_idle_ms: int = Field(default=60_000, ge=1)
    """A delivered entry unacknowledged this long is presumed to belong to a dead consumer and is reclaimed.
    Must exceed the longest learner step, or a slow consumer's entries are trained on twice."""

    read_block_ms: int = Field(default=1000, ge=0)
    """How long one read waits for new entries before returning what it has."""

    dead_letter_maxlen: int = Field(default=100_000, ge=1)
    """Approximate cap on the dead-letter stream; the counters keep the full totals."""


class LonghaulConfig(_Section):
    """A whole run."""

    run_name: str = "default"
    """Names the run's Redis keys, so several runs can share one server."""

    redis: RedisConfig = RedisConfig()
    buffer: BufferConfig = BufferConfig()

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_key_segment(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"must be 1-64 characters of letters, digits, '_', '.' or '-', got {name!r}")
        return name


class ConfigError(ValueError):
    """A config file or override that does not describe a valid run; the message names the offending field."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> LonghaulConfig:
    """Build the run config from an optional YAML file and `dotted.key=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like section.field=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    try:
        return LonghaulConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path or 'config'}: {problems}") from exc
