"""Learner checkpoints: written whole or not at all, and the commit point of the buffer's acknowledgements.

Layout of `checkpoint_dir/step-00000042/`:
- `model/`: the policy as a Hugging Face directory (safetensors weights, config, tokenizer and chat template copied
  from the model the run started from), loadable by transformers and by vLLM as it stands;
- `trainer_state.pt`: optimizer, LR schedule, RNG states, sampler state, step and policy version, and the buffer
  entries this checkpoint acknowledges (`consumed`);
- `state.json`: the same scalars, for people and scripts.

A checkpoint is written into `step-XXXXXXXX.partial/`, every file fsynced, then renamed into place and the parent
directory fsynced: a crash at any moment leaves the previous checkpoint intact and at most a `.partial` directory,
which the next save removes. Only complete directories count as checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"step-(\d{8})")
# Files of a Hugging Face model directory that are not weights or config: the tokenizer and chat template the
# actors' engines need to load a checkpoint.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "vocab.json", "merges.txt", "generation_config.json")


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = sorted(int(m.group(1)) for p in directory.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name)))
    return checkpoint_path(directory, steps[-1]) if steps else None


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any], *,
                    model_state: dict[str, torch.Tensor] | None = None, tokenizer_dir: Path | None, keep: int) -> Path:
    """Write the checkpoint of `step` atomically; delete all but the newest `keep` afterwards. Returns its path.

    `model_state` is the full (gathered) state dict of a sharded model; None saves `model`'s own parameters."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    partial = final.with_name(final.name + ".partial")
    for stale in directory.glob("*.partial"):
        shutil.rmtree(stale)
    partial.mkdir()
    model.save_pretrained(partial / "model", state_dict=model_state, safe_serialization=True)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file() and not (partial / "model" / name).exists():
                shutil.copyfile(source, partial / "model" / name)
    torch.save(trainer_state, partial / "trainer_state.pt")
    summary = {k: v for k, v in trainer_state.items() if isinstance(v, int | float | str)}
    summary["written_at"] = time.time()
    (partial / "state.json").write_text(json.dumps(summary, indent=2) + "\n")
    _fsync_tree(partial)
    if final.exists():  # a checkpoint of this step from before a crash: the new one supersedes it
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(directory)
    complete = sorted(p for p in directory.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))
    for old in complete[:-keep]:
        shutil.rmtree(old)
    return final


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path` (tensors and plain Python values only: no pickled code runs)."""
    # On the CPU first: a checkpoint written on a GPU must resume anywhere; the optimizer moves its state to the
    # parameters' device when it loads it.
    return torch.load(Path(path) / "trainer_state.pt", weights_only=True, map_location="cpu")


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
