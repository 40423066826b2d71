"""Data-parallel learning with FSDP2: one learner process per device, the same training loop in each.

Launch with torchrun (`torchrun --nproc-per-node N -m longhaul.cli learner ...`); a single process (the CPU default)
takes none of these paths. With N processes:
- the model is sharded with `fully_shard`, each decoder layer a unit and the root last (NCCL on GPUs, gloo on CPU);
- rank 0 alone talks to the buffer (read, commit, recover) and broadcasts each batch to the other ranks in the
  trajectory wire format; every rank packs the same micro-batches and trains every N-th of them, so the update
  equals the single-process one. FSDP averages gradients over ranks where this loss needs their sum (each rank's
  share is already normalised by the valid tokens of the whole batch), so each rank scales its loss by N (gloo
  cannot take FSDP's own divide-factor override: it has no pre-multiplied sum);
- checkpoints gather full state dicts (model and optimizer) and rank 0 writes them, so a checkpoint is the same
  Hugging Face directory at any N and a run may resume at another N;
- weight broadcast: every rank iterates the weight source (each full tensor is gathered collectively), rank 0 sends.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from longhaul.buffer.store import Delivery
from longhaul.trajectory import decode_trajectory, encode_trajectory

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def init_from_environment() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1); nothing for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def device() -> torch.device:
    """Where this learner process trains: its GPU (`cuda:LOCAL_RANK`, selected by `init_from_environment`) when
    CUDA is available, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, world size) of this learner process."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a Hugging Face causal LM over every process of the group: each decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def broadcast_batch(batch: list[Delivery] | None) -> list[Delivery] | None:
    """Rank 0's batch (or None: no batch this time) on every rank, sent in the trajectory wire format."""
    rank, _ = world()
    message: list[Any] = [None]
    if rank == 0 and batch is not None:
        message = [[(d.entry_id, encode_trajectory(d.trajectory), d.source, d.staleness, d.weight) for d in batch]]
    dist.broadcast_object_list(message, src=0)
    if message[0] is None:
        return None
    if rank == 0:
        return batch
    return [Delivery(entry_id, decode_trajectory(payload), source, staleness, weight)
            for entry_id, payload, source, staleness, weight in message[0]]


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (a collective: every rank calls it), without tied duplicates: gathered
    tensors no longer share memory, so `lm_head.weight` would be saved beside the embedding it is tied to, where a
    single-process checkpoint has it once."""
    state = get_model_state_dict(model, options=_FULL)
    unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in unique}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state on CPU, keyed by parameter name (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def gather_to_rank0(value: Any) -> list[Any] | None:
    """Every rank's `value` on rank 0 (None elsewhere)."""
    rank, size = world()
    gathered = [None] * size if rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def all_sum(values: list[float]) -> list[float]:
    # On the process group's device: NCCL reduces CUDA tensors only.
    tensor = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.tolist()
