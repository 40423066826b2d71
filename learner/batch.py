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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from longhaul.buffer.store import Delivery
from longhaul.learner.grammar_mask import GrammarMasks, unpack_bitmask
from longhaul.learner.metrics import GRAMMAR_REFUSED

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """Padded tensors of `rows` sequences; per-token tensors are [rows, length − 1], aligned on predicted tokens."""

    indices: list[int]
    """Position of each row's trajectory in the step's batch."""
    input_ids: torch.Tensor
    """[rows, length] int64, right-padded with 0."""
    attention_mask: torch.Tensor
    """[rows, length] int64: 1 on real tokens."""
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
                       grammars: GrammarMasks | None = None) -> list[MicroBatch]:
    """Split a step's batch into padded micro-batches of at most `micro_batch_tokens` (padded) tokens each.

    With `grammars`, the constrained turns of each trajectory get their admitted-token masks; without, every token
    is scored over the whole vocabulary (what the warm-up's teacher forcing wants)."""
    if len(deliveries) != len(advantages):
        raise ValueError(f"{len(deliveries)} deliveries but {len(advantages)} advantages")
    lengths = [len(d.trajectory.token_ids) for d in deliveries]
    order = sorted(range(len(deliveries)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for index in order:
        # Longest first, so the first row of a micro-batch sets its padded length.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= micro_batch_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return [_pad(deliveries, advantages, rows, grammars) for rows in groups]


def _pad(deliveries: list[Delivery], advantages: torch.Tensor, rows: list[int],
         grammars: GrammarMasks | None) -> MicroBatch:
    length = max(len(deliveries[i].trajectory.token_ids) for i in rows)
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


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                   constrained: Constraints | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log π of each next token, and the entropy of each next-token distribution (no gradient).

    `logits` is the model output [rows, length, vocab]; both results are [rows, length − 1]. The log-softmax is
    taken one row at a time so that only one row's [length, vocab] float32 copy exists at once on top of the
    logits themselves, and the entropy reuses it instead of a second pass over the vocabulary. At `constrained`
    positions both are of the distribution renormalised over the admitted tokens, the one the engine sampled."""
    logp_rows, entropy_rows = [], []
    targets = input_ids[:, 1:]
    for row in range(logits.shape[0]):
        row_logp = torch.log_softmax(logits[row, :-1].float(), dim=-1)
        token_logp = row_logp.gather(-1, targets[row].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(row_logp.exp() * row_logp).sum(-1)
        if constrained is not None and bool((selected := constrained.rows == row).any()):
            columns = constrained.columns[selected]
            admitted = unpack_bitmask(constrained.bitmask[selected], logits.shape[-1])
            masked = torch.log_softmax(logits[row, columns].float().masked_fill(~admitted, -torch.inf), dim=-1)
            token_logp = token_logp.index_put((columns,), masked.gather(-1, targets[row, columns, None]).squeeze(-1))
            with torch.no_grad():
                p_logp = torch.where(admitted, masked.exp() * masked, torch.zeros((), device=masked.device))
                entropy = entropy.index_put((columns,), -p_logp.sum(-1))
        logp_rows.append(token_logp)
        entropy_rows.append(entropy)
    return torch.stack(logp_rows), torch.stack(entropy_rows)
