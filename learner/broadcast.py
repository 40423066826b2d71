"""The learner's side of weight sync: broadcast the policy to the actors' engines, then publish its version.

The transfer itself is vLLM's trainer weight-transfer engine: the built-in `nccl` on GPUs, `longhaul_gloo`
(`longhaul/weight_sync.py`) on CPU, both driving the engines through a `VLLMWeightSyncClient`. Every parameter is
sent under the name vLLM loads, tied duplicates included, cast to the engines' dtype (a float32 learner sends half
the bytes to bf16 engines).

Order matters for staleness: the version is published in Redis only after `finish_weight_update` returned on every
engine, so an actor admitted under version v really generates with v's weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, VLLMWeightSyncClient, WeightSource
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from longhaul.buffer.staleness import StalenessGate
from longhaul.learner import metrics
from longhaul.weight_sync import GlooTrainerInitInfo, ModelWeightSource, register, tensor_nbytes


class CastWeightSource(WeightSource):
    """A WeightSource whose tensors are cast to `dtype` on the way out."""

    def __init__(self, source: WeightSource, dtype: torch.dtype):
        self._source = source
        self._dtype = dtype

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(m.name, self._dtype if m.dtype.is_floating_point else m.dtype, m.shape)
                for m in self._source.metadata()]

    def __iter__(self):
        for name, tensor in self._source:
            yield name, tensor.to(self._dtype) if tensor.is_floating_point() else tensor


class _VersionedClient:
    """Passes the version being sent to `finish_weight_update`: vLLM's trainer engines call it without one."""

    def __init__(self, client: VLLMWeightSyncClient):
        self._client = client
        self.version: str | None = None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._client.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self._client.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._client.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._client.finish_weight_update(self.version if weight_version is None else weight_version)


@dataclass(frozen=True, slots=True)
class SyncResult:
    version: int
    seconds: float
    bytes: int


class WeightBroadcaster:
    """Owns the trainer side of one weight-transfer group (the learner plus every engine worker). In a sharded
    learner every rank builds one (`rank`); rank 0 sends, the others join the gathers of the full tensors."""

    def __init__(self, model: torch.nn.Module, client: VLLMWeightSyncClient, *, backend: str, master_address: str,
                 master_port: int, world_size: int, engine_dtype: torch.dtype, bucket_bytes: int,
                 gate: StalenessGate | None = None, timeout_s: float = 300.0, rank: int = 0):
        register()
        self._client = _VersionedClient(client)
        self._source = CastWeightSource(ModelWeightSource(model), engine_dtype)
        self._gate = gate
        if backend == "longhaul_gloo":
            init_info = GlooTrainerInitInfo(master_address=master_address, master_port=master_port,
                                            world_size=world_size, bucket_bytes=bucket_bytes, timeout_s=timeout_s,
                                            rank=rank)
        elif backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            init_info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port,
                                            world_size=world_size, packed_buffer_size_bytes=bucket_bytes, rank=rank)
        else:
            raise ValueError(f"unknown weight transfer backend {backend!r}: expected 'nccl' or 'longhaul_gloo'")
        self.bytes_per_sync = sum(tensor_nbytes(m.dtype, m.shape) for m in self._source.metadata())
        self._engine = WeightTransferTrainerFactory.trainer_init(init_info, client=self._client, source=self._source)

    def sync(self, version: int) -> SyncResult:
        """Send the current weights as `version`, then publish the version; timed and exported."""
        start = time.perf_counter()
        self._client.version = str(version)
        self._engine.send_weights()
        seconds = time.perf_counter() - start
        metrics.WEIGHT_SYNC_SECONDS.observe(seconds)
        metrics.WEIGHT_SYNC_BYTES.inc(self.bytes_per_sync)
        if self._gate is not None:
            self._gate.publish_version(version)
        return SyncResult(version, seconds, self.bytes_per_sync)

    def shutdown(self) -> None:
        self._engine.shutdown()

