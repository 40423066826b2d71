"""Bounded staleness: the policy version in Redis, admission of new episodes, and the train-time filter.

Admission is AReaL's rule. With v the published policy version, s = max_staleness and B = batch_size, an actor may
start an episode only while admitted < (v + s + 1) × B, where `admitted` counts every episode ever admitted (running
or finished). Trained batches are at most s versions behind the episodes that fill them, and actors run ahead of the
learner by at most s batches instead of flooding the buffer.

At train time a trajectory finished by a policy more than s versions old (its newest generated token's version) is
dropped or down-weighted, by config, and counted either way. Its age counts from the end, not the start: an episode
of 40+ tool calls spans more learner steps than s, and measured from its first token (as before) every one of them
was dropped: long-horizon episodes never trained. Its older tokens are off-policy by more than s; the loss weighs
each token by its own behaviour logprob (VESPO sums the per-token log-ratios into the sequence weight, and its
kernel shrinks a far-off-policy sequence's). Admission still bounds how far ahead of the learner an episode starts.

Admissions are also kept per holder (the actor that asked) in a `holdings` hash: +n when admitted, −1 in the same
transaction as the XADD of each of its trajectories (`TrajectoryStore.append`), −n on `release`. An actor that dies
with episodes in flight leaves exactly their count there, and `release_holder` returns those slots. Without it every
killed actor would shrink the admission window for good, and enough kills would stall the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis

from longhaul.buffer import metrics
from longhaul.config import StalenessConfig

# KEYS: version key, counters hash, holdings hash. ARGV: max_staleness, batch_size, n, holder ('' for none).
# Returns 1 if admitted, else 0.
_ADMIT = """
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
local admitted = tonumber(redis.call('HGET', KEYS[2], 'admitted') or '0')
local n = tonumber(ARGV[3])
if admitted + n <= (version + tonumber(ARGV[1]) + 1) * tonumber(ARGV[2]) then
  redis.call('HINCRBY', KEYS[2], 'admitted', n)
  if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[4], n) end
  return 1
end
redis.call('HINCRBY', KEYS[2], 'admission_rejected', n)
return 0
"""

# Versions only move forward: a late or replayed publish of an older version must not reopen admission.
_PUBLISH = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if new > current then redis.call('SET', KEYS[1], new); return new end
return current
"""

# KEYS: counters hash, holdings hash. ARGV: holder. Returns the admissions released (the holder's episodes that never
# produced a trajectory); a negative holding (appends without admission, e.g. tools writing directly) releases none.
_RELEASE_HOLDER = """
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HDEL', KEYS[2], ARGV[1])
if held > 0 then redis.call('HINCRBY', KEYS[1], 'admitted', -held); return held end
return 0
"""


@dataclass(frozen=True, slots=True)
class StalenessVerdict:
    staleness: int
    """Learner version minus the newest version that generated a token of the trajectory."""
    action: Literal["train", "downweight", "drop"]
    weight: float
    """Loss weight to train with (0 for a dropped trajectory)."""


class StalenessGate:
    """The policy version and both staleness rules of one run."""

    def __init__(self, client: redis.Redis, version_key: str, counters_key: str, holdings_key: str,
                 config: StalenessConfig):
        self._client = client
        self._version_key = version_key
        self._counters_key = counters_key
        self.holdings_key = holdings_key
        self.config = config
        self._admit = client.register_script(_ADMIT)
        self._publish = client.register_script(_PUBLISH)
        self._release_holder = client.register_script(_RELEASE_HOLDER)

    def version(self) -> int:
        """The policy version the actors currently have (0 before the first publish)."""
        return int(self._client.get(self._version_key) or 0)

    def publish_version(self, version: int) -> int:
        """Record that every actor now generates with `version`. Returns the stored version (never decreases)."""
        stored = int(self._publish(keys=[self._version_key], args=[version]))
        metrics.POLICY_VERSION.set(stored)
        return stored

    def try_admit(self, episodes: int = 1, holder: str = "") -> bool:
        """Admit `episodes` new episodes if the admission rule allows all of them; counted (in episodes) either way.
        `holder` (the actor's id, which its trajectories carry as `actor_id`) records who holds the admissions."""
        admitted = bool(self._admit(keys=[self._version_key, self._counters_key, self.holdings_key],
                                    args=[self.config.max_staleness, self.config.batch_size, episodes, holder]))
        metrics.ADMISSION.labels("admitted" if admitted else "rejected").inc(episodes)
        return admitted

    def release(self, episodes: int = 1, holder: str = "") -> None:
        """Return admissions of episodes that ended without producing a trajectory (e.g. an episode that raised)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hincrby(self._counters_key, "admitted", -episodes)
        if holder:
            pipe.hincrby(self.holdings_key, holder, -episodes)
        pipe.execute()

    def release_holder(self, holder: str) -> int:
        """Return every admission `holder` still holds (its episodes in flight when it died or was abandoned);
        returns how many. Call it only once the holder can append no more."""
        return int(self._release_holder(keys=[self._counters_key, self.holdings_key], args=[holder]))

    def holdings(self) -> dict[str, int]:
        """Episodes admitted and not yet appended, by holder."""
        return {k.decode(): int(v) for k, v in self._client.hgetall(self.holdings_key).items()}

    def judge(self, newest_version: int, learner_version: int) -> StalenessVerdict:
        """Decide how training treats a trajectory whose newest generated token came from `newest_version`."""
        staleness = max(0, learner_version - newest_version) if newest_version >= 0 else 0
        if staleness <= self.config.max_staleness:
            return StalenessVerdict(staleness, "train", 1.0)
        if self.config.policy == "drop":
            return StalenessVerdict(staleness, "drop", 0.0)
        return StalenessVerdict(staleness, "downweight", self.config.downweight)
