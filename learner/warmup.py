"""Supervised warm-up: cross-entropy on the expert's tokens of demonstration trajectories, before RL.

A random tiny model earns reward 0 (it cannot write a tool call), and a policy gradient of all-zero rewards is zero.
Imitating a scripted expert for a few minutes gives RL a policy that sometimes succeeds. The demonstrations are
ordinary `Trajectory` records (mask 1 on the expert's tokens), so they are packed by the learner's own
`pack_micro_batches` and scored by its `policy_logprobs`: the warm-up trains on exactly the token alignment RL uses.

The loss of a step is −Σ m_t log π_θ(y_t) over the step's demonstrations divided by their masked tokens, so
micro-batching does not change the update. With `WarmupConfig.grammar_scored`, π at a constrained token is
renormalised over what its turn's grammar admits, as the engine samples it: the forced tokens of a call's JSON then
cost nothing, and the loss is spent on the decisions. The passes run in bf16 where the CPU has bf16 units
(`WarmupConfig.compute_dtype`), the weights and the optimizer in float32. The driver builds the trajectories (this
package never imports `actors/`) and passes them in; `warm_up` writes a Hugging Face model directory (weights in the
base model's dtype, plus the base directory's tokenizer and generation files) that engines and the learner load like
any other.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from longhaul.buffer.store import Delivery
from longhaul.config import WarmupConfig
from longhaul.learner.batch import (
    MicroBatch,
    autocast,
    compute_dtype,
    length_multiple,
    pack_micro_batches,
    policy_logprobs,
)
from longhaul.learner.grammar_mask import GrammarMasks
from longhaul.learner.trainer import lr_factor
from longhaul.trajectory import Trajectory

# Files of a model directory that are not weights: copied unchanged, so the warmed-up model tokenizes and stops
# exactly as the base model did.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True, slots=True)
class WarmupResult:
    model_dir: Path
    steps: int
    seconds: float
    tokens_trained: int
    """Masked (expert) tokens summed over all steps."""
    loss_first: float
    """Mean per-token cross-entropy of the first step."""
    loss_last: float
    losses: list[float]


def _batches(trajectories: list[Trajectory], batch_tokens: int, rng: random.Random) -> list[list[Trajectory]]:
    """One epoch: the trajectories shuffled, cut into consecutive batches of at most `batch_tokens` tokens (a longer
    trajectory gets a batch of its own)."""
    order = rng.sample(trajectories, len(trajectories))
    batches: list[list[Trajectory]] = []
    size = 0
    for trajectory in order:
        if batches and size + trajectory.num_tokens <= batch_tokens:
            batches[-1].append(trajectory)
            size += trajectory.num_tokens
        else:
            batches.append([trajectory])
            size = trajectory.num_tokens
    return batches


def _as_deliveries(batch: list[Trajectory]) -> list[Delivery]:
    return [Delivery(entry_id=b"", trajectory=t, source="fresh", staleness=0, weight=1.0) for t in batch]


def pack_demonstrations(batch: list[Trajectory], micro_batch_tokens: int, grammars: GrammarMasks | None = None,
                        dtype: torch.dtype = torch.float32) -> list[MicroBatch]:
    """A step's demonstrations as micro-batches for passes in `dtype`; with `grammars`, their constrained turns
    carry what each turn's grammar admitted, so that the loss scores those tokens the way the engine samples them."""
    return pack_micro_batches(_as_deliveries(batch), torch.zeros(len(batch)), micro_batch_tokens, grammars,
                              length_multiple=length_multiple(dtype))


def sft_loss(model, micro_batches: list[MicroBatch], *, backward: bool,
             dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """Mean cross-entropy per masked token of `micro_batches` under `model`, its passes autocast to `dtype`, and the
    masked token count; with `backward`, the gradient of that mean accumulates in the model. A demonstration its
    grammar refuses (weight 0) counts for nothing."""
    masks = [mb.loss_mask * mb.sequence_weights[:, None] for mb in micro_batches]
    valid = sum(float(mask.sum()) for mask in masks)
    if valid == 0:
        raise ValueError("no masked token in the batch: demonstrations must carry loss_mask 1 on the expert's turns")
    total = 0.0
    for mb, mask in zip(micro_batches, masks, strict=True):
        with torch.set_grad_enabled(backward), autocast("cpu", dtype):
            logp, _ = policy_logprobs(model, mb, with_entropy=False)
            loss = -(logp * mask).sum() / valid
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total, int(valid)


def warm_up(base_model_dir: str | Path, out_dir: str | Path, trajectories: list[Trajectory],
            config: WarmupConfig, *, on_step: Callable[[int, int, float, float], None] | None = None) -> WarmupResult:
    """Train the model in `base_model_dir` on the expert tokens of `trajectories`; write it to `out_dir`.

    Stops after `config.epochs` passes, `config.max_steps` steps, or the step that crosses `config.time_budget_s`,
    whichever comes first. `out_dir` must not exist or be empty; it appears complete or not at all. `on_step(step,
    total_steps, loss, seconds)` is called after every step (progress for the caller to show)."""
    if not trajectories:
        raise ValueError("no demonstrations to warm up on")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: refusing to overwrite it")
    base_model_dir = Path(base_model_dir)
    rng = random.Random(f"longhaul-warmup:{config.seed}")
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model.train()
    steps_per_epoch = len(_batches(trajectories, config.batch_tokens, random.Random(0)))
    total_steps = min(config.max_steps, config.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    grammars = GrammarMasks.for_model(base_model_dir, model.config.vocab_size) if config.grammar_scored else None
    dtype = compute_dtype(config.compute_dtype)
    started = time.monotonic()
    losses: list[float] = []
    tokens_trained = 0
    batches = (batch for _ in range(config.epochs) for batch in _batches(trajectories, config.batch_tokens, rng))
    # Each step packs its own batch, in this thread: packing is Python (the grammar replay, ~0.04 s a step), and
    # done in a second thread while the passes ran, it held the GIL the passes' operator dispatch waits on (a
    # default warm-up's steps took 1.28× as long).
    for batch in itertools.islice(batches, total_steps):
        micro_batches = pack_demonstrations(batch, config.micro_batch_tokens, grammars, dtype)
        # The cosine runs over the steps or the time budget, whichever is spent faster: a warm-up cut short by its
        # budget still ends at the low rate that consolidates what it learned.
        spent = max(len(losses) / total_steps, (time.monotonic() - started) / config.time_budget_s)
        factor = lr_factor(min(total_steps, round(spent * total_steps)), config.warmup_steps, total_steps, "cosine")
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * factor
        loss, tokens = sft_loss(model, micro_batches, backward=True, dtype=dtype)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        tokens_trained += tokens
        elapsed = time.monotonic() - started
        if on_step is not None:
            on_step(len(losses), total_steps, loss, elapsed)
        if elapsed >= config.time_budget_s:
            break
    seconds = time.monotonic() - started
    _save(model, base_model_dir, out_dir)
    return WarmupResult(out_dir, len(losses), seconds, tokens_trained, losses[0], losses[-1], losses)


def _save(model, base_model_dir: Path, out_dir: Path) -> None:
    """The model in the base directory's weight dtype, with every non-weight file of the base directory."""
    base_dtype = json.loads((base_model_dir / "config.json").read_text()).get("dtype", "float32")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        for path in base_model_dir.iterdir():
            if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != "config.json":
                shutil.copy2(path, staging / path.name)
        model.to(getattr(torch, base_dtype) if isinstance(base_dtype, str) else torch.float32)
        model.save_pretrained(staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def cross_entropy(model_dir: str | Path, trajectories: list[Trajectory], *, grammar_scored: bool = True,
                  micro_batch_tokens: int = 16384) -> float:
    """Mean cross-entropy per expert token of `trajectories` under the model in `model_dir` (no update), scored as
    `WarmupConfig.grammar_scored` trains: how well a model imitates demonstrations it was not trained on."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    grammars = GrammarMasks.for_model(model_dir, model.config.vocab_size) if grammar_scored else None
    loss, _ = sft_loss(model, pack_demonstrations(trajectories, micro_batch_tokens, grammars), backward=False)
    return loss if math.isfinite(loss) else float("inf")
