"""Weight sync from the learner to the actors' vLLM engines: the one module both sides import.

vLLM 0.32 splits a transfer into a worker-side `WeightTransferEngine` (inside each inference worker:
`init_transfer_engine` → per round `start_weight_update`, `update_weights`..., `finish_weight_update`) and a
trainer-side `TrainerWeightTransferEngine` that drives that lifecycle through a four-method client
(`VLLMWeightSyncClient`) while it sends the bytes. On GPUs longhaul uses the built-in `nccl` backend. On CPU there is
no NCCL, so this module provides `longhaul_gloo`: the same lifecycle over a torch gloo process group, registered in
vLLM through the `vllm.general_plugins` entry point (see pyproject.toml) so that every worker process finds it.

The data path of `longhaul_gloo`: the trainer and every worker derive the same bucket plan from the parameter
metadata (`plan_buckets`); per bucket the trainer packs the tensors' bytes into one flat buffer and broadcasts it;
each worker broadcasts into an equal buffer, views the tensors out of it and hands them to `model.load_weights`
inside vLLM's layerwise reload (a plain `load_weights` on a running CPU engine fails: its weights are repacked).

Tied embeddings: `named_parameters()` yields a tied weight once (as the embedding), but a vLLM reload that never
sees `lm_head.weight` keeps the old head and its logprobs go silently wrong. `ModelWeightSource` therefore sends
every name, tied duplicates included.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch.distributed import BroadcastOptions, PrefixStore, ProcessGroupGloo, TCPStore
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
    materialize_full_tensor,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.weight_transfer import WeightTransferConfig

BACKEND = "longhaul_gloo"
# 64 MiB: large enough that per-bucket overhead (one broadcast, one load_weights call) is noise for models of any
# size, small enough that trainer and workers each hold only one extra bucket of memory during a sync.
DEFAULT_BUCKET_BYTES = 64 << 20
_STORE_PREFIX = "longhaul-weight-sync"


# ---- the shared wire plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    """Consecutive parameters broadcast as one flat byte buffer; `offsets[i]` is where parameter i starts."""

    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    nbytes: int


def plan_buckets(meta: list[ParamMeta], bucket_bytes: int) -> list[Bucket]:
    """Split parameters, in order, into buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its own).

    Trainer and workers both call this on the same metadata, so they agree on every buffer size and offset without
    exchanging them. Offsets are 16-byte aligned so that every dtype view of the buffer is aligned."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[Bucket] = []
    names: list[str] = []
    dtypes: list[torch.dtype] = []
    shapes: list[tuple[int, ...]] = []
    offsets: list[int] = []
    size = 0
    for param in meta:
        nbytes = tensor_nbytes(param.dtype, param.shape)
        start = _align(size)
        if names and start + nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(names), tuple(dtypes), tuple(shapes), tuple(offsets), size))
            names, dtypes, shapes, offsets, size, start = [], [], [], [], 0, 0
        names.append(param.name)
        dtypes.append(param.dtype)
        shapes.append(tuple(param.shape))
        offsets.append(start)
        size = start + nbytes
    if names:
        buckets.append(Bucket(tuple(names), tuple(dtypes), tuple(shapes), tuple(offsets), size))
    return buckets


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a dense tensor of `dtype` and `shape`."""
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def _align(offset: int) -> int:
    return (offset + 15) // 16 * 16


def _unpack(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of each parameter inside a received bucket buffer (no copies)."""
    tensors = []
    for name, dtype, shape, offset in zip(bucket.names, bucket.dtypes, bucket.shapes, bucket.offsets, strict=True):
        tensors.append((name, buffer[offset:offset + tensor_nbytes(dtype, shape)].view(dtype).view(shape)))
    return tensors


def _metadata_from_wire(names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> list[ParamMeta]:
    meta = []
    for name, dtype_name, shape in zip(names, dtype_names, shapes, strict=True):
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"parameter {name!r}: unknown dtype {dtype_name!r}")
        meta.append(ParamMeta(name, dtype, tuple(shape)))
    return meta


def _gloo_group(master_address: str, master_port: int, rank: int, world_size: int,
                timeout_s: float) -> ProcessGroupGloo:
    # A group of its own, not torch.distributed's default one: vLLM's workers may already have initialised that,
    # and a learner under FSDP certainly has. Rank 0 (the trainer) hosts the rendezvous store.
    timeout = datetime.timedelta(seconds=timeout_s)
    store = TCPStore(master_address, master_port, world_size, is_master=(rank == 0), timeout=timeout)
    return ProcessGroupGloo(PrefixStore(_STORE_PREFIX, store), rank, world_size, timeout)


def _broadcast(group: ProcessGroupGloo, buffer: torch.Tensor) -> None:
    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([buffer], options).wait()


# ---- worker side (inside each vLLM worker process) ----------------------------------------------------------------


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """What a worker needs to join the trainer's gloo group. The trainer is rank 0; workers follow at
    `rank_offset` + their global worker rank."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 300.0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """One round's parameter metadata, in send order; the bucket plan is derived from it on both sides."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes differ in length: "
                             f"{len(self.names)}, {len(self.dtype_names)}, {len(self.shapes)}")


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    """Receives bucketed weights over gloo and loads them through vLLM's layerwise reload."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config: WeightTransferConfig, vllm_config: VllmConfig, device: torch.device,
                 model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self._group: ProcessGroupGloo | None = None
        self._bucket_bytes = DEFAULT_BUCKET_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        # Unique across data-parallel replicas, as in vLLM's NCCL engine.
        parallel = self.parallel_config
        worker_rank = parallel.data_parallel_index * parallel.world_size + parallel.rank
        self._bucket_bytes = init_info.bucket_bytes
        self._group = _gloo_group(init_info.master_address, init_info.master_port,
                                  init_info.rank_offset + worker_rank, init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self._group is None:
            raise RuntimeError("longhaul_gloo weight transfer is not initialised: call init_weight_transfer_engine "
                               "(the trainer's trainer_init does) before update_weights")
        meta = _metadata_from_wire(update_info.names, update_info.dtype_names, update_info.shapes)
        for bucket in plan_buckets(meta, self._bucket_bytes):
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8)
            _broadcast(self._group, buffer)
            self.model.load_weights(_unpack(bucket, buffer))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        self._group = None  # gloo tears its connections down with the object


# ---- trainer side (inside the learner) ----------------------------------------------------------------------------


class ModelWeightSource(WeightSource):
    """Every parameter of a Hugging Face model under the names vLLM loads, tied duplicates included (see the module
    docstring). FSDP-sharded parameters are gathered one at a time as they are sent."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def _named(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._model.named_parameters(remove_duplicate=False)

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, p.dtype, tuple(p.shape)) for name, p in self._named()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self._named():
            yield name, materialize_full_tensor(param)


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info for `longhaul_gloo`. `world_size` = 1 trainer + every inference worker."""

    backend: ClassVar[str] = BACKEND
    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 300.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Broadcasts the learner's weights bucket by bucket while the workers receive them."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool,
                 bucket_bytes: int) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self._group: ProcessGroupGloo | None = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> Self:
        if source is None:
            raise ValueError("longhaul_gloo weight transfer needs a WeightSource (e.g. ModelWeightSource(model))")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port, rank_offset=1,
            world_size=init_info.world_size, bucket_bytes=init_info.bucket_bytes, timeout_s=init_info.timeout_s)
        # The workers block inside init_weight_transfer_engine until every rank has joined, so the RPC runs on a side
        # thread while this thread opens rank 0.
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine._group = _gloo_group(init_info.master_address, init_info.master_port, 0, init_info.world_size,
                                        init_info.timeout_s)
            joined.result()
        return engine

    def send_weights(self, weight_version: str | None = None) -> None:
        """One full round: start, broadcast every bucket while the workers receive, finish (tagging the version)."""
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # keep the trainer-side gathers (FSDP) in lockstep with the sender
                pass
            return
        update = GlooWeightTransferUpdateInfo(names=[m.name for m in meta],
                                              dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
                                              shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(update))
            self._broadcast_buckets(meta)
            received.result()
        finally:
            # If a broadcast failed, the workers are stuck in the matching collective and the RPC never returns:
            # waiting for it would turn the error into a hang. The group is unusable either way.
            pool.shutdown(wait=False)
        self.client.finish_weight_update(weight_version)

    def _broadcast_buckets(self, meta: list[ParamMeta]) -> None:
        assert self._group is not None, "trainer_init opens the group before any send"
        tensors = iter(self.source)
        for bucket in plan_buckets(meta, self.bucket_bytes):
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8)
            # The bucket's own sequences go first: zip stops on them before drawing a tensor for the next bucket.
            for expected, offset, (name, tensor) in zip(bucket.names, bucket.offsets, tensors, strict=False):
                if name != expected:
                    raise RuntimeError(f"WeightSource yielded {name!r} where its metadata promised {expected!r}")
                flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
                buffer[offset:offset + flat.numel()].copy_(flat)
            _broadcast(self._group, buffer)

    def shutdown(self) -> None:
        self._group = None


class LoopClient:
    """`VLLMWeightSyncClient` for an engine in this process whose four weight-sync methods are coroutines on
    `loop` (`longhaul.actors.engine.InferenceEngine`), called from another thread: the trainer engine blocks while
    it sends, so it must not run on the loop the engine needs."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, timeout_s: float = 600.0):
        self._engine = engine
        self._loop = loop
        self._timeout_s = timeout_s

    def _call(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self._timeout_s)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call(self._engine.init_weight_transfer_engine(init_info))

    def start_weight_update(self) -> None:
        self._call(self._engine.start_weight_update())

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._call(self._engine.update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call(self._engine.finish_weight_update(weight_version))


# ---- registration -------------------------------------------------------------------------------------------------

_registered = threading.Lock()


def register() -> None:
    """Register `longhaul_gloo` with vLLM's weight-transfer factories. The `vllm.general_plugins` entry point calls
    this in every vLLM process; vLLM may call it more than once per process, so it is idempotent."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    with _registered:
        if BACKEND not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
        if BACKEND not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine(BACKEND, GlooTrainerWeightTransferEngine)
