"""The learner: batches from the buffer in, optimizer steps, checkpoints and weight broadcasts out.

One step, from a batch of whole groups (see `sampler.py`):
1. group advantages from the trajectories' rewards (`advantages.py`);
2. micro-batches packed by a token budget (`batch.py`); per micro-batch a forward pass of the trainer's own model
   (transformers) recomputes log π_θ of every token, the configured off-policy loss (`losses.py`) weighs it against
   the behaviour logprobs the engine recorded, and the gradients accumulate. The loss is a sum over tokens divided by
   the valid tokens of the whole batch, so micro-batching never changes the update;
3. gradient clip, AdamW step, schedule step; the policy version (= steps taken) goes up by one.

Commit point. Buffer entries are acknowledged only when a checkpoint covering their step is on disk: the checkpoint
records which entries it covers, and after `save_checkpoint` returns the learner commits exactly those. A crash
before the commit is repaired on restart (the commit of the newest checkpoint is repeated; commits are idempotent);
a crash after it loses nothing acknowledged. Entries trained after the newest checkpoint are still pending, come back
through the sampler's `recover`, and are trained again from the restored state, so a resumed run ends where an
uninterrupted one would.

Decoupled PPO needs π_prox, the policy at the start of the step. A step makes one optimizer update, so π_prox is
log π_θ itself, detached, and costs no extra forward pass.

Every step appends one JSON line to `checkpoint_dir/steps.jsonl`: its figures and the ids of the trajectories it
trained on (a step retrained after a crash appears again; the later line is the one that counts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM

from longhaul.buffer.store import Consumed, Delivery, TrajectoryStore
from longhaul.config import LonghaulConfig
from longhaul.learner import distributed, metrics
from longhaul.learner.advantages import group_advantages
from longhaul.learner.batch import (
    MicroBatch,
    autocast,
    compute_dtype,
    length_multiple,
    pack_micro_batches,
    policy_logprobs,
)
from longhaul.learner.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from longhaul.learner.grammar_mask import GrammarMasks
from longhaul.learner.losses import LossOutput, compute_loss, importance_stats
from longhaul.learner.sampler import Sampler, make_sampler

if TYPE_CHECKING:  # vLLM is imported only by a learner that talks to engines: loading it costs seconds
    from longhaul.learner.broadcast import WeightBroadcaster

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A step trained and was logged, but its weights did not reach every actor."""


def _version_range(batch: list[Delivery]) -> list[int]:
    """[oldest, newest] policy version that generated a token of the batch ([-1, -1] if none did)."""
    generated = [d.trajectory.versions[d.trajectory.loss_mask > 0] for d in batch]
    generated = [v for v in generated if len(v)]
    if not generated:
        return [-1, -1]
    return [min(int(v.min()) for v in generated), max(int(v.max()) for v in generated)]


def _to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    """The micro-batch's tensors on the learner's device (the same object on the CPU)."""
    if device.type == "cpu":
        return mb
    moved = {f.name: getattr(mb, f.name).to(device, non_blocking=True)
             for f in dataclasses.fields(mb) if isinstance(getattr(mb, f.name), torch.Tensor)}
    return dataclasses.replace(mb, **moved, constrained=mb.constrained and mb.constrained.to(device))


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then constant or cosine down to 10 %."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class Learner:
    """Trains the policy in `model_dir` on the run's buffer; resumes from the newest checkpoint if there is one."""

    def __init__(self, config: LonghaulConfig, model_dir: Path, store: TrajectoryStore,
                 sampler: Sampler | None = None):
        self.config = config
        settings = config.learner
        self.rank, self.world_size = distributed.world()
        self._store = store
        self._checkpoint_dir = config.checkpoint_dir
        resume_from = latest_checkpoint(self._checkpoint_dir)
        self.model_dir = resume_from / "model" if resume_from else Path(model_dir)
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        # The process's GPU when there is one (NCCL weight sync and FSDP2 on NCCL need the parameters there), else CPU.
        self.device = distributed.device()
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, settings.dtype))
        self.model.to(self.device)
        self.model.train()
        self.grammars = GrammarMasks.for_model(self.model_dir, self.model.config.vocab_size)
        self.compute_dtype = compute_dtype(settings.compute_dtype, self.device)
        if self.world_size > 1:
            self.model = distributed.shard(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.learning_rate, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, settings.warmup_steps, settings.total_steps, settings.schedule))
        # Rank 0 alone reads and commits: the buffer sees one consumer however many processes train.
        self.sampler = sampler or (make_sampler(config, store) if self.rank == 0 else None)
        self.step = 0
        self.broadcaster: WeightBroadcaster | None = None
        self._uncommitted: list[Delivery] = []
        if resume_from is not None:
            self._resume(resume_from)

    @property
    def version(self) -> int:
        """Policy version of the current weights: the initial weights are version 0 and each step adds one, so it
        is the step count (kept in checkpoints under both names for people reading `state.json`)."""
        return self.step

    # ---- the loop ---------------------------------------------------------------------------------------------

    def train_step(self, timeout_s: float = 1.0) -> dict[str, Any] | None:
        """Take one step if a batch arrives within `timeout_s`; return its record, or None if none came."""
        waited = time.perf_counter()
        batch = self.sampler.next_batch(self.version, timeout_s) if self.rank == 0 else None
        if self.world_size > 1:
            batch = distributed.broadcast_batch(batch)
        waited = time.perf_counter() - waited
        if batch is None:
            return None
        metrics.BATCH_WAIT_SECONDS.observe(waited)
        started = time.perf_counter()
        record = self._update(batch)
        self._uncommitted += batch
        if self.sampler is not None:  # read, never to be trained (out of a scheduler's window): committed unused
            self._uncommitted += self.sampler.take_retired()
        record["step_seconds"] = time.perf_counter() - started
        record["wait_seconds"] = waited
        metrics.STEP_SECONDS.observe(record["step_seconds"])
        if self.step % self.config.learner.checkpoint_every == 0:
            record["checkpoint_seconds"] = self.checkpoint()
        if self.broadcaster is not None and self.step % self.config.learner.sync_every == 0:
            try:
                record["weight_sync_seconds"] = self.broadcaster.sync(self.version).seconds
            except Exception as error:
                # The step itself stands (and is logged); the actors keep their older weights until the caller has
                # re-formed the group (`connect_actors`), which sends the current ones.
                record["weight_sync_error"] = f"{type(error).__name__}: {error}"
                self._log_step(record)
                raise WeightSyncError(f"step {self.step}: weight sync failed: {error}") from error
        self._log_step(record)
        return record

    def run(self, steps: int | None = None, *, should_stop=lambda: False, timeout_s: float = 1.0) -> None:
        """Train until `steps` steps in all (default `learner.total_steps`) or `should_stop()`; checkpoint at the
        end so a clean stop leaves nothing to retrain."""
        target = self.config.learner.total_steps if steps is None else steps
        last_report = time.monotonic()
        while self.step < target and not should_stop():
            record = self.train_step(timeout_s)
            if record is None:
                if time.monotonic() - last_report > 30:
                    log.info("step %d: waiting for trajectories (buffer: %s)", self.step, self._store.stats())
                    last_report = time.monotonic()
                continue
            log.info("step %d/%d  loss %.4f  reward %.3f  tokens %d  %.2fs", self.step, target, record["loss"],
                     record["reward_mean"], record["tokens"], record["step_seconds"])
        self.finish()

    def finish(self) -> None:
        """Checkpoint what was trained since the last checkpoint, if anything: a clean stop retrains nothing."""
        if self._uncommitted:
            self.checkpoint()

    # ---- one update -------------------------------------------------------------------------------------------

    def _update(self, batch: list[Delivery]) -> dict[str, Any]:
        settings = self.config.learner
        rewards = torch.tensor([d.trajectory.reward for d in batch], dtype=torch.float32)
        advantages = group_advantages(rewards, [d.trajectory.group_id for d in batch], settings.advantage)
        micro_batches = pack_micro_batches(batch, advantages, settings.micro_batch_tokens, self.grammars,
                                           length_multiple=length_multiple(self.compute_dtype))
        valid_tokens = sum(float(mb.loss_mask.sum()) for mb in micro_batches)
        loss_total, entropy_total, parts = 0.0, 0.0, []
        # Rank r trains micro-batches r, r + N, ...; every rank runs the same number of passes (FSDP's collectives
        # need all of them), a rank short of work repeating micro-batch 0 with its loss scaled to nothing.
        passes = -(-len(micro_batches) // self.world_size)
        for index in range(self.rank, passes * self.world_size, self.world_size):
            mb = _to_device(micro_batches[index] if index < len(micro_batches) else micro_batches[0], self.device)
            # × N: FSDP averages the ranks' gradients, this loss needs their sum (learner/distributed.py).
            scale = float(self.world_size) if index < len(micro_batches) else 0.0
            with autocast(self.device, self.compute_dtype):
                logp, entropy = policy_logprobs(self.model, mb, temperature=self.config.agent.temperature)
            output = compute_loss(settings.loss, logp, mb.behavior_logp, mb.advantages, mb.loss_mask,
                                  params=settings.loss_params, proximal_logp=logp.detach())
            loss = scale * (output.token_loss * mb.sequence_weights[:, None]).sum() / max(valid_tokens, 1.0)
            loss.backward()
            if scale:
                loss_total += float(loss.detach()) / self.world_size
                entropy_total += float((entropy * mb.loss_mask).sum())
                valid = mb.loss_mask > 0
                # On the CPU: rank 0 gathers them as objects, and the statistics are a few quantiles.
                parts.append((output.weights[valid].cpu(), output.clipped[valid].cpu(), output.masked[valid].cpu()))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if self.world_size > 1:
            loss_total, entropy_total = distributed.all_sum([loss_total, entropy_total])
            parts = [part for rank_parts in (distributed.gather_to_rank0(parts) or []) for part in rank_parts]
        learning_rate = self.scheduler.get_last_lr()[0]
        update = "applied"
        if not math.isfinite(grad_norm):  # a poisoned batch must not poison the weights: keep the step, not the update
            update = "skipped: non-finite gradient"
            log.warning("step %d: non-finite gradient norm, update skipped", self.step + 1)
        elif grad_norm == 0.0:
            # No signal (every group's rewards equal, so every advantage is 0). AdamW would still move each weight
            # by up to the learning rate along the momentum of earlier batches; with rare rewards that drift
            # outweighs the signal (measured in the default run: 27 of 30 steps had no gradient, and the policy
            # still drifted from 6.7 to 2.1 tool calls per held-out episode).
            update = "skipped: no signal"
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

        def joined(k: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.cat([p[k] for p in parts])[None] if parts else torch.zeros(1, 0, dtype=dtype)

        weights = LossOutput(token_loss=torch.zeros(0), weights=joined(0, torch.float32),
                             clipped=joined(1, torch.bool), masked=joined(2, torch.bool))
        stats = importance_stats(weights, torch.ones_like(weights.weights))
        tokens = sum(mb.tokens for mb in micro_batches)
        record = {
            "step": self.step, "version": self.version, "time": time.time(), "loss": loss_total, "grad_norm": grad_norm,
            "update": update, "learning_rate": learning_rate, "reward_mean": float(rewards.mean()),
            "success_rate": sum(d.trajectory.reward_parts.get("exact_match", 0.0) for d in batch) / len(batch),
            "tool_calls_mean": sum(d.trajectory.num_tool_calls for d in batch) / len(batch),
            "tool_calls_max": max(d.trajectory.num_tool_calls for d in batch),
            "entropy_mean": entropy_total / max(valid_tokens, 1.0),
            "staleness_mean": sum(d.staleness for d in batch) / len(batch),
            "staleness_max": max(d.staleness for d in batch),
            "behavior_versions": _version_range(batch),
            "trajectories": len(batch), "tokens": tokens, "trained_tokens": int(valid_tokens),
            "micro_batches": len(micro_batches), "importance": stats,
            "trajectory_ids": [d.trajectory_id for d in batch],
            "actor_ids": [d.trajectory.actor_id for d in batch],
        }
        self._export(record)
        return record

    def _export(self, record: dict[str, Any]) -> None:
        metrics.STEPS.inc()
        metrics.TOKENS.inc(record["tokens"])
        metrics.TRAINED_TOKENS.inc(record["trained_tokens"])
        metrics.TRAJECTORIES.inc(record["trajectories"])
        metrics.POLICY_VERSION.set(record["version"])
        metrics.LOSS.set(record["loss"])
        metrics.GRAD_NORM.set(record["grad_norm"])
        metrics.LEARNING_RATE.set(record["learning_rate"])
        metrics.REWARD.set(record["reward_mean"])
        metrics.ENTROPY.set(record["entropy_mean"])
        metrics.STALENESS.set(record["staleness_mean"])
        stats = record["importance"]
        for name in ("mean", "p50", "p90", "p99", "max"):
            metrics.IMPORTANCE_WEIGHT.labels(name).set(stats[f"weight_{name}"])
        metrics.CLIPPED_FRACTION.set(stats["clipped_fraction"])
        metrics.MASKED_FRACTION.set(stats["masked_fraction"])

    def _log_step(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self._checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with open(self._checkpoint_dir / "steps.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")

    # ---- checkpoints and resume -------------------------------------------------------------------------------

    def checkpoint(self) -> float:
        """Write a checkpoint of the current step, then acknowledge everything trained since the last one."""
        started = time.perf_counter()
        if self.world_size > 1:  # collectives: every rank gathers, rank 0 writes
            model_state = distributed.full_model_state(self.model)
            optimizer_state = distributed.full_optimizer_state(self.model, self.optimizer)
        else:
            model_state, optimizer_state = None, self.optimizer.state_dict()
        if self.rank != 0:
            self._uncommitted = []
            torch.distributed.barrier()
            return time.perf_counter() - started
        consumed = [[d.entry_id.decode(), d.trajectory_id, d.source] for d in self._uncommitted]
        state = {
            "step": self.step, "version": self.version, "optimizer": optimizer_state, "world_size": self.world_size,
            "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(), "sampler": self.sampler.state_dict(), "consumed": consumed,
            "consumer": self.config.learner.consumer,
        }
        save_checkpoint(self._checkpoint_dir, self.step, self.model, state, model_state=model_state,
                        tokenizer_dir=self.model_dir, keep=self.config.learner.keep_checkpoints)
        self._store.commit(self.config.learner.consumer, self.step, self._uncommitted)
        self._uncommitted = []
        if self.world_size > 1:
            torch.distributed.barrier()
        seconds = time.perf_counter() - started
        metrics.CHECKPOINT_SECONDS.observe(seconds)
        return seconds

    def _resume(self, path: Path) -> None:
        state = load_trainer_state(path)
        if state["consumer"] != self.config.learner.consumer:
            raise ValueError(f"checkpoint {path} was written by consumer {state['consumer']!r}, this learner is "
                             f"{self.config.learner.consumer!r}: its unacknowledged entries would be lost; set "
                             f"learner.consumer={state['consumer']}")
        if int(state.get("world_size", 1)) != self.world_size:
            raise ValueError(f"checkpoint {path} was written by {state.get('world_size', 1)} learner processes, this "
                             f"run has {self.world_size}: resume with the same number (optimizer states are laid out "
                             "differently)")
        if self.world_size > 1:
            distributed.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        # The crash may have come between writing the checkpoint and its commit: repeat the commit (idempotent).
        if self.rank == 0:
            self._store.commit(self.config.learner.consumer, self.step,
                               [Consumed(entry.encode(), trajectory_id, source)
                                for entry, trajectory_id, source in state["consumed"]])
        log.info("resumed from %s: step %d, policy version %d", path, self.step, self.version)

    # ---- actors -----------------------------------------------------------------------------------------------

    def connect_actors(self, client, *, backend: str, master_address: str, master_port: int, world_size: int,
                       engine_dtype: torch.dtype, timeout_s: float = 300.0) -> WeightBroadcaster:
        """Open the weight-transfer group with the actors' engines (reached through `client`) and send them the
        current weights, so that actors joining a resumed run start from the learner's policy. Called again when the
        actors change, the new group replaces the old one. Every learner process calls it (each full tensor is
        gathered collectively); only rank 0 uses `client` and sends. `timeout_s` bounds each collective."""
        from longhaul.learner.broadcast import WeightBroadcaster

        self.disconnect_actors()  # a new membership replaces the old group
        self.broadcaster = WeightBroadcaster(
            self.model, client, rank=self.rank, backend=backend, master_address=master_address, master_port=master_port,
            world_size=world_size, engine_dtype=engine_dtype, bucket_bytes=self.config.learner.sync_bucket_mib << 20,
            gate=self._store.staleness if self.rank == 0 else None, timeout_s=timeout_s)
        self.broadcaster.sync(self.version)
        return self.broadcaster

    def disconnect_actors(self) -> None:
        """Close the weight-transfer group (no actors left to sync); steps go on without syncing."""
        if self.broadcaster is not None:
            self.broadcaster.shutdown()
            self.broadcaster = None
