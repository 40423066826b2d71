"""From delivered trajectories to padded micro-batches a causal LM can score.

A trajectory's tokens are scored as next-token predictions: position t of the model's output predicts token t + 1,
so every per-token tensor here is aligned on the predicted token and one shorter than the sequence. Loss mask,
behaviour logprobs and versions of token 0 are dropped with it (token 0 is always prompt, mask 0).

Micro-batches bound activation memory by a token budget: sequences sorted by length, longest first, are packed
greedily while (sequences × padded length) stays within `micro_batch_tokens`. Sorting keeps padding small when
episode lengths vary by 10× (a 3-call episode beside a 45-call one); a sequence over the budget gets a micro-batch of
its own rather than being cut, because a cut episode would be scored without its context.

Tokens of constrained turns are scored under their turn's grammar (`learner/grammar_mask.py`): the micro-batch carries
the admitted-token bitmask of each, and `token_logprobs` renormalises the logits over it, as the engine did.
`policy_logprobs` runs the model on a micro-batch and scores its trained tokens only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from longhaul.buffer.store import Delivery
from longhaul.learner.grammar_mask import GrammarMasks, unpack_bitmask
from longhaul.learner.metrics import GRAMMAR_REFUSED

logger = logging.getLogger(__name__)

BF16_SHAPE_MULTIPLE = 256
"""What a bf16 pass on CPU rounds its data-dependent sizes up to (output rows here; micro-batch lengths through
`pack_micro_batches(length_multiple=)`): oneDNN compiles a kernel for each matrix shape it has not seen, so sizes
from a few shapes let it reuse them (`WarmupConfig.compute_dtype`)."""


def compute_dtype(setting: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The autocast dtype of the policy's passes on `device` for a `compute_dtype` setting (`WarmupConfig`,
    `LearnerConfig`). `auto`: bfloat16 where the hardware has bf16 matrix units (a CUDA GPU that supports it, a CPU
    with AMX or AVX512-BF16), float32 elsewhere, where bf16 would be emulated and slower."""
    if setting != "auto":
        return getattr(torch, setting)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # Private but stable since torch 2.3; a torch without them is treated as a CPU without bf16 units.
    native = any(getattr(torch.cpu, probe, lambda: False)()
                 for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return torch.bfloat16 if native else torch.float32


def length_multiple(dtype: torch.dtype) -> int:
    """The `pack_micro_batches(length_multiple=)` of passes in `dtype` (`BF16_SHAPE_MULTIPLE` under bf16)."""
    return BF16_SHAPE_MULTIPLE if dtype == torch.bfloat16 else 1


def autocast(device: torch.device | str, dtype: torch.dtype):
    """`torch.autocast` to `dtype` on `device`'s type, off for float32: matrix products and attention run in
    `dtype`, the weights, their gradients and the log-softmax (`token_logprobs`) stay float32."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """Padded tensors of `rows` sequences; per-token tensors are [rows, length − 1], aligned on predicted tokens."""

    indices: list[int]
    """Position of each row's trajectory in the step's batch."""
    input_ids: torch.Tensor
    """[rows, length] int64, right-padded with 0."""
    attention_mask: torch.Tensor
    """[rows, length] int64: 1 on real tokens. It counts them; the model is given none (`policy_logprobs`)."""
    loss_mask: torch.Tensor
    """[rows, length − 1] float32: 1 on generated tokens to train."""
    behavior_logp: torch.Tensor
    """[rows, length − 1] float32: log μ of each predicted token (0 off the mask)."""
    advantages: torch.Tensor
    """[rows] float32."""
    sequence_weights: torch.Tensor
    """[rows] float32: the staleness policy's loss weight (1, or the down-weight of an over-stale trajectory)."""
    constrained: Constraints | None = None
    """The predicted tokens that a grammar constrained, with what it admitted; None if none was."""

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens in the micro-batch: what the forward pass costs."""
        return int(self.attention_mask.sum())


@dataclass(frozen=True, slots=True)
class Constraints:
    """Grammar-constrained predicted tokens of a micro-batch, P of them."""

    rows: torch.Tensor
    """[P] int64: the row of each."""
    columns: torch.Tensor
    """[P] int64: its column in the per-token tensors (token index − 1)."""
    bitmask: torch.Tensor
    """[P, ceil(vocab/32)] int32: the tokens its grammar admitted (`grammar_mask.unpack_bitmask`)."""

    def to(self, device: torch.device) -> Constraints:
        return Constraints(self.rows.to(device), self.columns.to(device), self.bitmask.to(device))


def pack_micro_batches(deliveries: list[Delivery], advantages: torch.Tensor, micro_batch_tokens: int,
                       grammars: GrammarMasks | None = None, *, length_multiple: int = 1) -> list[MicroBatch]:
    """Split a step's batch into padded micro-batches of at most `micro_batch_tokens` (padded) tokens each.

    With `grammars`, the constrained turns of each trajectory get their admitted-token masks; without, every token
    is scored over the whole vocabulary (what the warm-up's teacher forcing wants). Each micro-batch's padded length
    is a multiple of `length_multiple` (see `WarmupConfig.compute_dtype` for why a pass would want that)."""
    if len(deliveries) != len(advantages):
        raise ValueError(f"{len(deliveries)} deliveries but {len(advantages)} advantages")
    if length_multiple < 1:
        raise ValueError(f"length_multiple must be at least 1, got {length_multiple}")
    lengths = [-(-len(d.trajectory.token_ids) // length_multiple) * length_multiple for d in deliveries]
    order = sorted(range(len(deliveries)), key=lambda i: (-len(deliveries[i].trajectory.token_ids), i))
    groups: list[list[int]] = []
    for index in order:
        # Longest first, so the first row of a micro-batch sets its padded length.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= micro_batch_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return [_pad(deliveries, advantages, rows, grammars, lengths[rows[0]]) for rows in groups]


def _pad(deliveries: list[Delivery], advantages: torch.Tensor, rows: list[int],
         grammars: GrammarMasks | None, length: int) -> MicroBatch:
    input_ids = torch.zeros(len(rows), length, dtype=torch.int64)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.int64)
    loss_mask = torch.zeros(len(rows), length - 1, dtype=torch.float32)
    behavior_logp = torch.zeros(len(rows), length - 1, dtype=torch.float32)
    for row, index in enumerate(rows):
        trajectory = deliveries[index].trajectory
        n = len(trajectory.token_ids)
        input_ids[row, :n] = torch.from_numpy(trajectory.token_ids.astype("int64"))
        attention_mask[row, :n] = 1
        loss_mask[row, :n - 1] = torch.from_numpy(trajectory.loss_mask[1:].astype("float32"))
        behavior_logp[row, :n - 1] = torch.from_numpy(trajectory.behavior_logprobs[1:].astype("float32"))
    sequence_weights = torch.tensor([deliveries[i].weight for i in rows], dtype=torch.float32)
    constrained, refused = _constraints(deliveries, rows, grammars) if grammars else (None, [])
    sequence_weights[refused] = 0.0
    return MicroBatch(
        indices=rows, input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
        behavior_logp=behavior_logp, advantages=advantages[rows].to(torch.float32),
        sequence_weights=sequence_weights, constrained=constrained,
    )


def _constraints(deliveries: list[Delivery], rows: list[int],
                 grammars: GrammarMasks) -> tuple[Constraints | None, list[int]]:
    """The micro-batch's constrained tokens, and the rows whose tokens their grammars refuse."""
    row_ids, columns, bitmasks, refused = [], [], [], []
    for row, index in enumerate(rows):
        trajectory = deliveries[index].trajectory
        if not trajectory.turn_grammars:
            continue
        try:
            positions, bitmask = grammars.admitted(trajectory)
        except ValueError as error:
            # Its behaviour logprobs are of no distribution this learner can reconstruct: it trains with weight 0
            # (acknowledged with its batch, so the buffer's books stay whole) and the log says why.
            logger.warning("trajectory %s trains with weight 0: %s", trajectory.trajectory_id, error)
            GRAMMAR_REFUSED.inc()
            refused.append(row)
            continue
        row_ids.append(torch.full((len(positions),), row, dtype=torch.int64))
        columns.append(torch.from_numpy(positions - 1))  # position 0 is prompt: never generated
        bitmasks.append(bitmask)
    if not sum(len(r) for r in row_ids):
        return None, refused
    return Constraints(torch.cat(row_ids), torch.cat(columns), torch.cat(bitmasks)), refused


def policy_logprobs(model: torch.nn.Module, mb: MicroBatch, *, temperature: float = 1.0,
                    with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π of each trained token of `mb` under `model`, and the entropy of each one's next-token distribution (no
    gradient; None without `with_entropy`); both [rows, length − 1], 0 off the loss mask.

    π is softmax(z / `temperature`), the distribution the rollouts sampled from and the engine reported behaviour
    logprobs of (`agent.temperature`); the warm-up imitates at 1.

    Only trained positions reach the output layer: a pre-hook hands it their hidden states alone. Generated tokens
    are a small share of an agent's episode (18 % of the default warm-up's tokens, the rest observations and
    prompts), and the output layer with its log-softmax is most of a small model's compute (measured: a default
    warm-up step 1.2 s → 0.7 s). The hook runs inside the model's own forward, so FSDP's hooks around it are kept.

    The model gets no padding mask: rows are right-padded, so under causal attention no real token sees a padding
    token, and the outputs at real tokens, the only ones read, are those of each sequence alone. Without a mask the
    attention kernel runs causal (it skips the blocks above the diagonal and builds no [rows, L, L] mask): the
    forward and backward of a default warm-up step take 1/1.13 of the time on CPU, with the same log-probs."""
    rows, columns = mb.loss_mask.nonzero(as_tuple=True)
    # The output layer's row count, which changes with every micro-batch, is rounded up to `BF16_SHAPE_MULTIPLE`
    # (repeats of the first trained position, dropped from its output). Free in float32 and on GPUs, whose kernels
    # are not per shape.
    padding = -len(rows) % BF16_SHAPE_MULTIPLE
    picked = (torch.cat([rows, rows[:1].expand(padding)]), torch.cat([columns, columns[:1].expand(padding)]))
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: (args[0][picked], *args[1:]))
    try:
        logits = model(input_ids=mb.input_ids).logits[:len(rows)]
    finally:
        hook.remove()
    if temperature != 1.0:
        logits = logits.float() / temperature
    admitted = None
    if mb.constrained is not None:
        position = torch.full(mb.loss_mask.shape, -1, dtype=torch.int64, device=rows.device)
        position[rows, columns] = torch.arange(len(rows), device=rows.device)
        at = position[mb.constrained.rows, mb.constrained.columns]
        kept = at >= 0  # a constrained token off the loss mask trains nothing
        admitted = (at[kept], unpack_bitmask(mb.constrained.bitmask[kept], logits.shape[-1]))
    logp, entropy = token_logprobs(logits, mb.input_ids[rows, columns + 1], admitted, with_entropy=with_entropy)

    def scatter(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mb.loss_mask.shape, dtype=x.dtype, device=x.device).index_put((rows, columns), x)

    return scatter(logp), (scatter(entropy) if entropy is not None else None)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   admitted: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                   with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π of each target token, and the entropy of each next-token distribution (no gradient; None without
    `with_entropy`, which saves a pass over the [P, vocab] distribution that a loss without an entropy term skips).

    `logits` [P, vocab] are the model's outputs at the positions predicting `targets` [P]; both results are [P].
    With `admitted` = (indices [C], mask [C, vocab] bool), the C positions at `indices` are of the distribution
    renormalised over their admitted tokens, the one the engine sampled under its grammar."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    if admitted is not None and len(admitted[0]):
        indices, allowed = admitted
        masked = torch.log_softmax(logits[indices].float().masked_fill(~allowed, -torch.inf), dim=-1)
        logp = logp.index_put((indices,), masked.gather(-1, targets[indices, None]).squeeze(-1))
        if entropy is not None:
            with torch.no_grad():
                p_logp = torch.where(allowed, masked.exp() * masked, torch.zeros((), device=masked.device))
                entropy = entropy.index_put((indices,), -p_logp.sum(-1))
    return logp, entropy
