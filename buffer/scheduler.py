"""The rollout scheduler: which fresh and replayed rollouts the learner trains on next (DESIGN.md: contextual rollout
bandit). It keeps the learner's sampler contract (`next_batch`, `state_dict`, `load_state_dict`, `take_retired`).

A round is one batch. It starts when complete groups worth a batch have arrived (or a partial group has waited out
`group_wait_s`), as FIFO would start one. Its candidates, each an arm of the bandit:
- fresh: the rollouts that arrived in this round or in the `L = history.rounds` rounds before it and were not
  selected yet. They stay pending in the buffer meanwhile (a crash loses none of them);
- replay: trajectories already trained on that the store still holds in its history (`TrajectoryStore.history`),
  fetched with `TrajectoryStore.replay` when picked.
Each arm gets a context vector (`FEATURES`): its reward, its advantage within its group and the group's reward
spread, its length, an estimate of the behaviour policy's entropy, its staleness, its tool calls, the times it has
been used, its age in rounds, and whether it is a replay. The entropy estimate is −mean(behaviour logprob) over the
generated tokens: the surprisal of the sampled tokens, whose expectation is the behaviour policy's entropy
(trajectories carry no entropy of their own).

A scorer gives every arm a score; `constrained_top` keeps the ceil(top_p · n_g) best of each group g (n_g its
candidates this round) and the `batch_size` best of those overall: the best arms (`selection: arms`), or whole
groups ranked by the mean score of what they keep (`selection: groups`), so that the learner's group advantages
cover every member it keeps. An arm is eligible only while its uses are below
`history.max_times_sampled` and, under the `drop` staleness policy, it is within `max_staleness`. The scorers:
- `NeuralUCBScorer` (`learner.sampler: bandit`): a small MLP f(x) predicts the selection reward; the exploration bonus
  is neural-linear UCB, α·sqrt(hᵀA⁻¹h), h the MLP's last hidden layer and A = λI + Σ h̄ h̄ᵀ over the selections it
  has learnt from (h̄ the mean h of a selection).
- `UniformScorer` (`learner.sampler: uniform`): independent uniform draws, the baseline under the same constraints.

The selection reward. A selection is made in round t; one round later its reward is
    R = V_{t+1} − V_t − w_e · 1[E_t > e_min] · (E_{t+1} − E_t),
V_t the mean reward and E_t the mean entropy estimate of the fresh rollouts that arrived in round t. The scheduler
measures both on what it reads: no evaluation runs, and the rollouts arriving after a step are the ones generated
by the newer policies (with the asynchrony's lag: they may come from any of the last `max_staleness` versions, which
makes R a noisy, delayed signal that the scorer averages over many rounds). The scorer learns that the mean of
f over the selection's arms predicts R (standardised over the selections it keeps), so predicted and realised
reward are comparable per selection and both are exported as metrics.

What is committed. Selected rollouts are committed by the learner with its step, as with FIFO: a fresh one enters
the replay history there, a replayed one has its use recorded there. A fresh rollout that is still unselected when
it is older than L rounds (any round at all when L = 0), or too stale to train, is retired: `take_retired` hands
it to the learner, which commits it with its next step without training on it. So nothing read stays pending
forever, and nothing is acknowledged before the checkpoint covering that decision exists. The store's commit has no
"acknowledge without training" of its own: a retired rollout is marked in the seen-set and enters the history like
a trained one (one recorded use), where the scheduler ignores it (it keeps no features for it); it leaves the stream
with its round.

Determinism and resume. Every draw comes from a seeded generator and every decision is a function of the arrivals
per round, so the same seed and the same arrivals give the same picks. `state_dict` keeps the scorer (weights, Adam
state, the selections it learns from), the features of the unselected fresh rollouts and of the trained ones that
may still be replayed, the uses handed out, the selections waiting for their reward, and the round. A restarted
learner gets the pending entries back through `recover`; those the checkpoint knew as candidates resume as such, the
rest arrive anew in the first round.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from longhaul.buffer import metrics
from longhaul.buffer.store import Delivery, TrajectoryStore
from longhaul.config import SchedulerConfig
from longhaul.trajectory import Trajectory

FEATURES = ("reward", "advantage", "group_std", "log_length", "entropy", "log_staleness", "log_tool_calls", "uses",
            "log_age", "replay", "bias")
"""The context vector of an arm, in order (see `context_matrix` for the transforms)."""

WINDOW = 256
"""Selections the bandit scorer refits on and builds A from: recent enough to follow a policy that changes, many
enough that the bonus of a well-explored context gets small (~α/sqrt(WINDOW))."""
FIT_STEPS = 4
"""Adam steps on the window per observed reward: each costs one forward/backward of at most WINDOW × batch arms."""
RIDGE = 1.0
"""λ of A = λI + Σ h̄ h̄ᵀ: the bonus of an unexplored direction starts at α/sqrt(λ)."""
_MAX_DRAIN_READS = 64
"""Reads per wait for a round, each up to a batch: bounds the time one call spends emptying a long backlog."""


# ---- the pure core: arms, contexts, selection, scorers, reward ---------------------------------------------------


@dataclass(slots=True)
class Arm:
    """One candidate rollout as the scheduler knows it: the time-independent part of its context and its uses.
    `uses` counts the training uses handed out (the store's count lags it until the next commit)."""

    trajectory_id: str
    group_id: str
    reward: float
    advantage: float
    """(reward − group mean) / group std over the whole group as it arrived; 0 in a constant group or alone."""
    group_std: float
    length: int
    """Generated (loss-mask) tokens."""
    entropy: float
    """−mean behaviour logprob over the generated tokens (0 if none)."""
    tool_calls: int
    newest_version: int
    """The policy version that finished it, where its staleness counts from (`Trajectory.newest_version`)."""
    arrival_round: int
    uses: int = 0
    trained_round: int = -1


def entropy_estimate(trajectory: Trajectory) -> float:
    """The sampled tokens' mean surprisal, an unbiased estimate of the behaviour policy's mean entropy."""
    generated = trajectory.loss_mask > 0
    return float(-trajectory.behavior_logprobs[generated].mean()) if generated.any() else 0.0


def arms_of_group(trajectories: Sequence[Trajectory], arrival_round: int) -> list[Arm]:
    """The arms of one group's members, their advantage and spread measured against each other (GRPO's std)."""
    rewards = np.asarray([t.reward for t in trajectories], dtype=np.float64)
    std = float(rewards.std(ddof=1)) if len(rewards) > 1 else 0.0
    advantages = (rewards - rewards.mean()) / std if std > 0 else np.zeros_like(rewards)
    return [
        Arm(t.trajectory_id, t.group_id, float(t.reward), float(a), std, int((t.loss_mask > 0).sum()),
            entropy_estimate(t), int(t.num_tool_calls), int(t.newest_version()), arrival_round)
        for t, a in zip(trajectories, advantages, strict=True)
    ]


def _columns(arms: Sequence[Arm]) -> np.ndarray:
    """[N, 9] float64: reward, advantage, group_std, length, entropy, newest_version, tool_calls, uses,
    arrival_round. One pass over the arms: at 10^5 candidates the Python loop is most of a round's cost."""
    return np.array([(a.reward, a.advantage, a.group_std, a.length, a.entropy, a.newest_version, a.tool_calls, a.uses,
                      a.arrival_round) for a in arms], dtype=np.float64).reshape(len(arms), 9)


def context_matrix(arms: Sequence[Arm], learner_version: int, round_: int) -> np.ndarray:
    """[N, len(FEATURES)] float32. Counts enter as log1p and advantages are clipped, so that no feature dwarfs the
    others in the scorer's first layer whatever the task's scale."""
    return _contexts(_columns(arms), learner_version, round_)


def _contexts(raw: np.ndarray, learner_version: int, round_: int) -> np.ndarray:
    staleness = np.where(raw[:, 5] >= 0, np.maximum(0.0, learner_version - raw[:, 5]), 0.0)
    out = np.empty((len(raw), len(FEATURES)), dtype=np.float32)
    out[:, 0] = raw[:, 0]
    out[:, 1] = np.clip(raw[:, 1], -3, 3)
    out[:, 2] = raw[:, 2]
    out[:, 3] = np.log1p(raw[:, 3]) / 10
    out[:, 4] = np.clip(raw[:, 4], 0, 10)
    out[:, 5] = np.log1p(staleness)
    out[:, 6] = np.log1p(raw[:, 6]) / 4
    out[:, 7] = raw[:, 7]
    out[:, 8] = np.log1p(np.maximum(0.0, round_ - raw[:, 8]))
    out[:, 9] = raw[:, 7] > 0
    out[:, 10] = 1.0
    return out


def group_quota(size: np.ndarray | int, top_p: float) -> np.ndarray:
    """Arms a group of `size` candidates may contribute: ceil(top_p · size), at least one. (The 1e-9 keeps a
    product like 0.3 · 10 = 3.0000000000000004 from rounding up to 4.)"""
    return np.maximum(1, np.ceil(np.asarray(size) * top_p - 1e-9).astype(np.int64))


def constrained_top(scores: np.ndarray, groups: np.ndarray, k: int, top_p: float,
                    eligible: np.ndarray | None = None, *, whole_groups: bool = False) -> np.ndarray:
    """Indices (ascending) of the selection: among eligible arms, the `group_quota` best of each group (groups are
    integer labels; a group's size counts its eligible arms), then the `k` best of those overall. Higher score is
    better, NaN is worst, and ties go to the lower index, so the result is a function of the inputs alone.

    `whole_groups`: the `k` are what whole groups keep instead, the groups taken by the mean score of their kept
    arms (ties to the lower label) while they fit; one that would overflow `k` is passed over for the next. The
    selection may then hold fewer than `k`."""
    index = np.arange(len(scores)) if eligible is None else np.flatnonzero(eligible)
    if k <= 0 or len(index) == 0:
        return np.zeros(0, dtype=np.int64)
    score = np.nan_to_num(np.asarray(scores, dtype=np.float64)[index], nan=-np.inf)
    group = np.asarray(groups)[index]
    order = np.lexsort((index, -score, group))  # by group, best first, lower index first
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, sizes)
    kept = order[rank < np.repeat(group_quota(sizes, top_p), sizes)]
    if len(kept) > k and whole_groups:
        labels, slot, counts = np.unique(group[kept], return_inverse=True, return_counts=True)
        # A NaN score is -inf here; clipped, it pulls its group's mean far down without making it -inf for all.
        means = np.bincount(slot, weights=np.maximum(score[kept], -1e300)) / counts
        taken, chosen = 0, np.zeros(len(labels), dtype=bool)
        for g in np.lexsort((labels, -means)):
            if taken + counts[g] <= k:
                chosen[g], taken = True, taken + counts[g]
        kept = kept[chosen[slot]]
    elif len(kept) > k:
        kept = kept[np.lexsort((index[kept], -score[kept]))[:k]]
    return np.sort(index[kept])


def select(arms: Sequence[Arm], scorer: Scorer, *, learner_version: int, round_: int, k: int, top_p: float,
           max_times: int, max_staleness: int | None, whole_groups: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One round's choice among `arms`: (their contexts, the chosen indices). Eligible are the arms used fewer than
    `max_times` times and, unless `max_staleness` is None (the `downweight` policy trains any staleness), at most
    `max_staleness` versions behind `learner_version` (the store's `judge`, vectorised)."""
    raw = _columns(arms)
    contexts = _contexts(raw, learner_version, round_)
    group_index: dict[str, int] = {}
    groups = np.fromiter((group_index.setdefault(a.group_id, len(group_index)) for a in arms), np.int64, len(arms))
    eligible = raw[:, 7] < max_times
    if max_staleness is not None:
        newest = raw[:, 5]
        eligible &= (newest < 0) | (learner_version - newest <= max_staleness)
    predicted, bonus = scorer.score(contexts)
    return contexts, constrained_top(predicted + bonus, groups, k, top_p, eligible, whole_groups=whole_groups)


def selection_reward(v_t: float, v_next: float, e_t: float, e_next: float, *, entropy_weight: float,
                     entropy_min: float) -> float:
    """R = V_{t+1} − V_t − w_e · 1[E_t > e_min] · (E_{t+1} − E_t) (DESIGN.md)."""
    penalty = entropy_weight * (e_next - e_t) if e_t > entropy_min else 0.0
    return (v_next - v_t) - penalty


class Scorer(Protocol):
    """Scores arms and learns from the rewards of its selections. Deterministic given its seed and inputs."""

    kind: str

    def score(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted selection reward, exploration bonus) per row of `contexts`; the selection ranks their sum."""

    def observe(self, contexts: np.ndarray, reward: float) -> float | None:
        """Learn that the selection of these arms earned `reward`; returns the fit's loss (None: nothing learnt)."""

    def predicted(self, contexts: np.ndarray) -> float:
        """The reward this scorer predicts for selecting these arms, in reward units."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class UniformScorer:
    """Independent uniform scores: selection uniformly at random under the same constraints."""

    kind = "uniform"

    def __init__(self, seed: int = 0):
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def score(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._rng.random(len(contexts)), np.zeros(len(contexts))

    def observe(self, contexts: np.ndarray, reward: float) -> float | None:
        return None

    def predicted(self, contexts: np.ndarray) -> float:
        return math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]


class NeuralUCBScorer:
    """f(x) = head(trunk(x)), trunk two tanh layers of `hidden_size` (the identity when 0: linear UCB), with the
    neural-linear bonus α·sqrt(hᵀA⁻¹h) on h = trunk(x).

    Rewards are standardised over the window before fitting, so α is in units of the reward's spread whatever its
    scale (a change of mean task reward between rounds is small)."""

    kind = "bandit"

    def __init__(self, num_features: int, *, hidden_size: int = 32, learning_rate: float = 0.01,
                 exploration: float = 1.0, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        if hidden_size:
            self.trunk: torch.nn.Module = torch.nn.Sequential(
                torch.nn.Linear(num_features, hidden_size), torch.nn.Tanh(),
                torch.nn.Linear(hidden_size, hidden_size), torch.nn.Tanh())
        else:
            self.trunk = torch.nn.Identity()
        width = hidden_size or num_features
        self.head = torch.nn.Linear(width, 1)
        with torch.no_grad():  # PyTorch's default init, drawn from our generator rather than the global one
            for module in [*self.trunk.modules(), self.head]:
                if isinstance(module, torch.nn.Linear):
                    bound = 1 / math.sqrt(module.in_features)
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 2 * bound - bound)
                    module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 2 * bound - bound)
        self.exploration = exploration
        self.optimizer = torch.optim.Adam(self.parameters(), lr=learning_rate)
        self.window: deque[tuple[torch.Tensor, float]] = deque(maxlen=WINDOW)
        self._a_inv = torch.eye(width) / RIDGE
        self._reward_mean, self._reward_std = 0.0, 1.0

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.trunk.parameters(), *self.head.parameters()]

    def score(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            h = self.trunk(torch.from_numpy(contexts))
            mean = self.head(h).squeeze(-1)
            bonus = self.exploration * ((h @ self._a_inv) * h).sum(-1).clamp_min(0).sqrt()
        return mean.double().numpy(), bonus.double().numpy()

    def predicted(self, contexts: np.ndarray) -> float:
        mean, _ = self.score(contexts)
        return self._reward_mean + self._reward_std * float(mean.mean()) if len(mean) else math.nan

    def observe(self, contexts: np.ndarray, reward: float) -> float | None:
        if len(contexts) == 0:
            return None
        self.window.append((torch.from_numpy(np.ascontiguousarray(contexts, dtype=np.float32)), float(reward)))
        rewards = torch.tensor([r for _, r in self.window], dtype=torch.float64)
        self._reward_mean = float(rewards.mean())
        std = float(rewards.std()) if len(rewards) > 1 else 0.0
        self._reward_std = std if std > 1e-12 else 1.0
        targets = ((rewards - self._reward_mean) / self._reward_std).float()
        x = torch.cat([c for c, _ in self.window])
        segment = torch.repeat_interleave(torch.arange(len(self.window)),
                                          torch.tensor([len(c) for c, _ in self.window]))
        counts = torch.bincount(segment, minlength=len(self.window)).float()

        def set_means(values: torch.Tensor) -> torch.Tensor:  # [rows, ...] → mean per selection
            total = torch.zeros((len(self.window), *values.shape[1:])).index_add(0, segment, values)
            return total / counts.view(-1, *([1] * (values.dim() - 1)))

        for _ in range(FIT_STEPS):
            loss = (set_means(self.head(self.trunk(x)).squeeze(-1)) - targets).square().mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            h_bar = set_means(self.trunk(x))
            loss = (self.head(h_bar).squeeze(-1) - targets).square().mean()  # f is linear in h: mean f = f(h̄)
            precision = RIDGE * torch.eye(h_bar.shape[1]) + h_bar.T @ h_bar
            self._a_inv = torch.linalg.inv(precision.double()).float()
        return float(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"trunk": self.trunk.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "window": [(c, r) for c, r in self.window],
                "a_inv": self._a_inv, "reward_mean": self._reward_mean, "reward_std": self._reward_std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trunk.load_state_dict(state["trunk"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.window = deque(((c, float(r)) for c, r in state["window"]), maxlen=WINDOW)
        self._a_inv = state["a_inv"]
        self._reward_mean, self._reward_std = float(state["reward_mean"]), float(state["reward_std"])


def make_scorer(kind: str, config: SchedulerConfig) -> Scorer:
    if kind == "bandit":
        return NeuralUCBScorer(len(FEATURES), hidden_size=config.hidden_size, learning_rate=config.learning_rate,
                               exploration=config.exploration, seed=config.seed)
    if kind == "uniform":
        return UniformScorer(config.seed)
    raise ValueError(f"no scheduler scorer {kind!r}; valid: bandit, uniform")


# ---- whole groups, shared with the FIFO sampler --------------------------------------------------------------------


class GroupAssembler:
    """Read trajectories held back until their group is complete (`group_size` members) or has waited `wait_s`:
    group advantages compare the members of a group, so a step trains on whole groups."""

    def __init__(self, group_size: int, wait_s: float):
        self.group_size = group_size
        self.wait_s = wait_s
        self.groups: OrderedDict[str, list[Delivery]] = OrderedDict()
        self._first_seen: dict[str, float] = {}

    def add(self, deliveries: Iterable[Delivery]) -> None:
        now = time.monotonic()
        for delivery in deliveries:
            group = delivery.trajectory.group_id
            self.groups.setdefault(group, []).append(delivery)
            self._first_seen.setdefault(group, now)

    def ready(self, group: str) -> bool:
        return (len(self.groups[group]) >= self.group_size
                or time.monotonic() - self._first_seen[group] >= self.wait_s)

    def pop(self, group: str) -> list[Delivery]:
        self._first_seen.pop(group)
        return self.groups.pop(group)

    @property
    def held(self) -> int:
        return sum(len(m) for m in self.groups.values())


# ---- the sampler: rounds over the buffer ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Selection:
    """A selection whose reward is known one round later."""

    contexts: np.ndarray
    value: float
    entropy: float
    predicted: float


class RolloutScheduler:
    """The learner's sampler for `learner.sampler: uniform | bandit`: one round of selection per batch."""

    def __init__(self, store: TrajectoryStore, consumer: str, scorer: Scorer, *, batch_size: int, group_size: int,
                 config: SchedulerConfig = SchedulerConfig(), commit_every: int = 1, group_wait_s: float = 120.0):
        if batch_size % group_size:
            raise ValueError(f"batch_size={batch_size} must be a multiple of group_size={group_size}")
        self._store = store
        self._consumer = consumer
        self.scorer = scorer
        self.kind = scorer.kind
        self.batch_size = batch_size
        self.config = config
        history = store.config.history
        self.rounds = history.rounds
        self.max_times = history.max_times_sampled
        self._replay = history.rounds > 0 and history.max_times_sampled > 1
        # A trained rollout reaches the history at the commit after its step, up to `commit_every` steps later.
        self._commit_lag = commit_every
        self._arriving = GroupAssembler(group_size, group_wait_s)
        self._held: OrderedDict[str, tuple[Delivery, Arm]] = OrderedDict()
        self._trained: dict[str, Arm] = {}
        self._in_history: set[str] = set()
        self._retired: list[Delivery] = []
        self._waiting: list[_Selection] = []
        self._restored: dict[str, Arm] = {}
        self._recovered = False
        self.round = 0
        self.counters = {"fresh": 0, "replay": 0, "retired": 0, "rounds_learnt": 0}
        self.last_round: dict[str, Any] = {}

    # ---- the Sampler contract ------------------------------------------------------------------------------------

    def next_batch(self, learner_version: int, timeout_s: float) -> list[Delivery] | None:
        if not self._recovered:
            found: dict[str, Delivery] = {}
            for delivery in self._store.recover(self._consumer, max_count=1 << 20, learner_version=learner_version):
                if delivery.trajectory_id in self._restored:
                    found[delivery.trajectory_id] = delivery
                else:
                    self._arriving.add([delivery])
            # In the checkpoint's order, which is not the stream's: candidate order is part of the picks. A checkpointed
            # candidate not pending any more was acknowledged by another consumer, and is gone.
            for tid, arm in self._restored.items():
                if tid in found:
                    self._held[tid] = (found[tid], arm)
            self._restored = {}
            self._recovered = True
        deadline = time.monotonic() + timeout_s
        while True:
            if self._round_ready():
                batch = self._round(learner_version)
                if batch:
                    return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            block_ms = max(1, int(min(remaining, 1.0) * 1000))
            for _ in range(_MAX_DRAIN_READS):
                got = self._store.read(self._consumer, self.batch_size, block_ms=block_ms,
                                       learner_version=learner_version)
                self._arriving.add(got)
                if len(got) < self.batch_size:
                    break
                block_ms = 0  # what is already there, without waiting again

    def take_retired(self) -> list[Delivery]:
        retired, self._retired = self._retired, []
        return retired

    @property
    def held(self) -> int:
        """Trajectories read and pending in the buffer, not yet handed out or retired."""
        return self._arriving.held + len(self._held)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "batch_size": self.batch_size, "round": self.round,
            "scorer": self.scorer.state_dict(),
            "held": [dataclasses.astuple(arm) for _, arm in self._held.values()],
            "trained": [dataclasses.astuple(arm) for arm in self._trained.values()],
            "in_history": sorted(self._in_history),
            "waiting": [(torch.from_numpy(s.contexts.copy()), s.value, s.entropy, s.predicted) for s in self._waiting],
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} sampler's state; this learner runs "
                             f"{self.kind!r}")
        self.round = int(state["round"])
        self.scorer.load_state_dict(state["scorer"])
        # Held rollouts are pending in the buffer: they come back through `recover` and resume as candidates.
        self._restored = {arm.trajectory_id: arm for arm in (Arm(*fields) for fields in state["held"])}
        self._trained = {arm.trajectory_id: arm for arm in (Arm(*fields) for fields in state["trained"])}
        self._in_history = set(state["in_history"])
        self._waiting = [_Selection(c.numpy(), float(v), float(e), float(p)) for c, v, e, p in state["waiting"]]
        self.counters = dict(state["counters"])

    # ---- one round -----------------------------------------------------------------------------------------------

    def _ready_groups(self) -> list[str]:
        return [g for g in self._arriving.groups if self._arriving.ready(g)]

    def _round_ready(self) -> bool:
        """As FIFO: complete groups worth a batch have arrived, or a group that cannot complete has waited out."""
        ready = self._ready_groups()
        return (sum(len(self._arriving.groups[g]) for g in ready) >= self.batch_size
                or any(len(self._arriving.groups[g]) < self._arriving.group_size for g in ready))

    def _round(self, learner_version: int) -> list[Delivery]:
        started = time.perf_counter()
        self.round += 1
        arrivals: list[Arm] = []
        for group in self._ready_groups():
            members = self._arriving.pop(group)
            for delivery, arm in zip(members, arms_of_group([d.trajectory for d in members], self.round),
                                     strict=True):
                self._held[delivery.trajectory_id] = (delivery, arm)
                arrivals.append(arm)
        value = float(np.mean([a.reward for a in arrivals]))
        entropy = float(np.mean([a.entropy for a in arrivals]))
        self._learn(value, entropy)
        self._retire(learner_version)

        replayable = self._replay_candidates()
        arms = [arm for _, arm in self._held.values()] + replayable
        staleness = self._store.staleness.config
        contexts, chosen = select(arms, self.scorer, learner_version=learner_version, round_=self.round,
                                  k=self.batch_size, top_p=self.config.top_p, max_times=self.max_times,
                                  max_staleness=staleness.max_staleness if staleness.policy == "drop" else None,
                                  whole_groups=self.config.selection == "groups")
        select_seconds = time.perf_counter() - started

        held = list(self._held.values())
        batch: list[Delivery] = []
        delivered: list[int] = []
        replay_ids = [arms[i].trajectory_id for i in chosen if i >= len(held)]
        for i in chosen:
            if i < len(held):
                delivery, arm = held[i]
                verdict = self._store.staleness.judge(arm.newest_version, learner_version)
                batch.append(dataclasses.replace(delivery, staleness=verdict.staleness, weight=verdict.weight))
                delivered.append(int(i))
                del self._held[arm.trajectory_id]
                if self._replay:
                    arm.trained_round = self.round
                    self._trained[arm.trajectory_id] = arm
        fetched = {d.trajectory_id: d for d in self._store.replay(replay_ids, learner_version=learner_version)}
        for i in chosen:
            if i >= len(held) and arms[i].trajectory_id in fetched:
                batch.append(fetched[arms[i].trajectory_id])
                delivered.append(int(i))
        for i in delivered:
            arms[i].uses += 1
        self._record(arms, contexts, delivered, fresh=sum(1 for i in delivered if i < len(held)), value=value,
                     entropy=entropy, candidates=len(arms), select_seconds=select_seconds)
        return batch

    def _learn(self, value: float, entropy: float) -> None:
        """The selections waiting for this round's V and E get their reward."""
        for selection in self._waiting:
            reward = selection_reward(selection.value, value, selection.entropy, entropy,
                                      entropy_weight=self.config.entropy_weight, entropy_min=self.config.entropy_min)
            loss = self.scorer.observe(selection.contexts, reward)
            self.counters["rounds_learnt"] += 1
            metrics.SCHEDULER_REALISED_REWARD.set(reward)
            metrics.SCHEDULER_PREDICTED_REWARD.set(selection.predicted)
            if loss is not None:
                metrics.SCHEDULER_LOSS.set(loss)
        self._waiting = []

    def _retire(self, learner_version: int) -> None:
        """Fresh rollouts out of the window, or too stale ever to train, go to the learner to be committed."""
        window = max(self.rounds, 1)
        for tid, (delivery, arm) in list(self._held.items()):
            if self.round - arm.arrival_round >= window or not self._trainable(arm, learner_version):
                del self._held[tid]
                self._retired.append(delivery)
                self.counters["retired"] += 1
                metrics.SCHEDULER_RETIRED.inc()

    def _trainable(self, arm: Arm, learner_version: int) -> bool:
        staleness = self._store.staleness
        return staleness.judge(arm.newest_version, learner_version).action != "drop"

    def _replay_candidates(self) -> list[Arm]:
        """Trained rollouts the store still holds for replay, and forgetting those it no longer does."""
        if not self._replay:
            return []
        history = self._store.history()
        listed = {h.trajectory_id: h for h in history}
        for tid, arm in list(self._trained.items()):
            entry = listed.get(tid)
            if entry is not None:
                self._in_history.add(tid)
                arm.uses = max(arm.uses, entry.uses)
            # Gone from the history after being in it, used up, or never committed within the commit lag
            # (its step was retrained after a crash under other picks): it can never be replayed.
            if ((entry is None and (tid in self._in_history
                                    or self.round - arm.trained_round > self.rounds + self._commit_lag))
                    or arm.uses >= self.max_times):
                del self._trained[tid]
                self._in_history.discard(tid)
        return [self._trained[h.trajectory_id] for h in history if h.trajectory_id in self._trained]

    def _record(self, arms: list[Arm], contexts: np.ndarray, delivered: list[int], *, fresh: int, value: float,
                entropy: float, candidates: int, select_seconds: float) -> None:
        chosen = contexts[delivered]
        predicted = self.scorer.predicted(chosen)
        self._waiting.append(_Selection(chosen, value, entropy, predicted))
        replay = len(delivered) - fresh
        self.counters["fresh"] += fresh
        self.counters["replay"] += replay
        self.last_round = {"round": self.round, "candidates": candidates, "fresh": fresh, "replay": replay,
                           "value": value, "entropy": entropy, "predicted": predicted,
                           "select_seconds": select_seconds}
        metrics.SCHEDULER_SELECTED.labels("fresh").inc(fresh)
        metrics.SCHEDULER_SELECTED.labels("replay").inc(replay)
        if delivered:
            metrics.SCHEDULER_FRESH_SHARE.set(fresh / len(delivered))
        for i in delivered:
            metrics.SCHEDULER_REUSE.observe(arms[i].uses)
        metrics.SCHEDULER_CANDIDATES.set(candidates)
        metrics.SCHEDULER_SELECT_SECONDS.observe(select_seconds)
