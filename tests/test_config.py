"""The typed config: every shipped config loads, and bad input fails at load time naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from longhaul.config import ConfigError, LonghaulConfig, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_describe_the_embedded_cpu_run():
    config = LonghaulConfig()
    assert config.redis.url is None
    assert config.redis.appendfsync == "always"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), LonghaulConfig)


def test_there_is_at_least_one_shipped_config():
    assert CONFIGS


def test_overrides_set_nested_fields_with_yaml_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("buffer:\n  staleness:\n    max_staleness: 2\n")
    config = load_config(path, ["buffer.staleness.max_staleness=8", "redis.appendfsync=always", "run_name=exp1"])
    assert (config.buffer.staleness.max_staleness, config.redis.appendfsync, config.run_name) == (8, "always", "exp1")


@pytest.mark.parametrize(("override", "named"), [
    ("buffer.staleness.max_stalenes=3", "buffer.staleness.max_stalenes: Extra inputs are not permitted"),
    ("buffer.staleness.max_staleness=-1", "buffer.staleness.max_staleness: Input should be greater than or equal to 0"),
    ("redis.url=http://x", "redis.url: Value error, must start with redis://"),
    ("redis.appendfsync=sometimes", "redis.appendfsync: Input should be 'always', 'everysec' or 'no'"),
    ("run_name=a b", "run_name: Value error, must be 1-64 characters"),
    ("buffer.rate_limiter.error_buffer=0.5", "a narrower window deadlocks inserts and samples together"),
    ("learner.sampler=random", "learner.sampler: Input should be 'fifo', 'uniform' or 'bandit'"),
    ("buffer.scheduler.top_p=0", "buffer.scheduler.top_p: Input should be greater than 0"),
    ("buffer.scheduler.top_p=1.5", "buffer.scheduler.top_p: Input should be less than or equal to 1"),
    ("buffer.scheduler.hidden_size=-1", "buffer.scheduler.hidden_size: Input should be greater than or equal to 0"),
    ("agent.temperature=0", "agent.temperature=0.0 must be > 0: rollouts at temperature 0 are greedy"),
    # The learner scores softmax(z / T) over the full vocabulary: a nucleus cut would make that the wrong policy.
    ("agent.top_p=0.9", "agent.top_p: Extra inputs are not permitted"),
])
def test_an_invalid_value_is_rejected_naming_the_field(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert named in str(error.value)


def test_a_malformed_override_or_file_says_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config(None, ["no-equals-sign"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["gpu.yaml", "multinode.yaml"])
def test_gpu_configs_sync_weights_over_nccl_into_a_local_model(name):
    config = load_config(Path(__file__).parent.parent / "configs" / name)
    assert config.engine.weight_transfer_backend == "nccl"
    assert config.model.path  # a local Hugging Face directory, not the tiny CPU model
    assert config.agent.max_episode_tokens <= config.engine.max_model_len
    # A pretrained model writes its own calls: no tiny-model crutches (constraints, warm-up on the toy expert).
    assert not config.agent.constrained_tool_calls and not config.agent.argument_choices
    assert config.warmup.enabled is not True


def test_multinode_config_joins_an_existing_cluster_and_a_shared_redis():
    config = load_config(Path(__file__).parent.parent / "configs" / "multinode.yaml")
    # An embedded Redis binds loopback on the head node: actors on other nodes could not append.
    assert config.train.ray_address == "auto" and config.redis.url is not None
    assert config.train.actors > 1
