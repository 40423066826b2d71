"""A learner's side of weight sync, run as a real separate process for tests: perturb a model, send it.

The process reaches the engine's four weight-sync calls through a pipe (`PipeClient`), the way a learner reaches an
actor through Ray; `Trainer.sync` answers those calls on the engine's side."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from longhaul.net import free_port

SPAWN = multiprocessing.get_context("spawn")


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            # The scale of the weights at initialisation: a large change, yet the regime a learner step stays in.
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    return model


def next_token_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log π(token_t | prompt, tokens_<t) under a transformers model, for every token after `prompt`."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits.float()
    logprobs = torch.log_softmax(logits[0, len(prompt) - 1:-1], dim=-1)
    return logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]


class PipeClient:
    """`VLLMWeightSyncClient` over a pipe: each call is answered by the process that owns the engine."""

    def __init__(self, conn):
        self._conn = conn

    def _call(self, method: str, payload=None):
        self._conn.send((method, payload))
        error = self._conn.recv()
        if error:
            raise RuntimeError(f"engine side of {method} failed:\n{error}")

    def init_weight_transfer_engine(self, init_info):
        self._call("init_weight_transfer_engine", init_info)

    def start_weight_update(self):
        self._call("start_weight_update")

    def update_weights(self, update_info):
        self._call("update_weights", update_info)

    def finish_weight_update(self, weight_version=None):
        self._call("finish_weight_update", weight_version)


class _Without:
    """A WeightSource minus one parameter: what a sync that forgets a tied weight sends."""

    def __init__(self, source, name):
        self._source, self._name = source, name

    def metadata(self):
        return [m for m in self._source.metadata() if m.name != self._name]

    def __iter__(self):
        return ((n, t) for n, t in self._source if n != self._name)


def _trainer(conn, model_dir: str, out_dir: str, port: int, seed: int, drop: str | None) -> None:
    try:
        from transformers import AutoModelForCausalLM
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from longhaul.weight_sync import GlooTrainerInitInfo, ModelWeightSource, register

        register()
        model = perturbed(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), seed)
        source = ModelWeightSource(model) if drop is None else _Without(ModelWeightSource(model), drop)
        conn.send(("ready", None))
        if conn.recv() != "go":
            return
        init = GlooTrainerInitInfo(master_address="127.0.0.1", master_port=port, world_size=2, rank=0,
                                   bucket_bytes=64 << 10)  # small buckets: this 0.3 MB model spans several
        engine = WeightTransferTrainerFactory.trainer_init(init, client=PipeClient(conn), source=source)
        engine.send_weights(weight_version=str(seed))
        model.save_pretrained(out_dir)
        conn.send(("done", None))
    except BaseException:
        conn.send(("failed", traceback.format_exc()))


class Trainer:
    """A trainer process that sends `model_dir` perturbed by `seed` as weight version `seed` (saved to `out_dir`)."""

    def __init__(self, model_dir: Path, out_dir: Path, seed: int, drop: str | None = None):
        self._conn, theirs = SPAWN.Pipe()
        self._process = SPAWN.Process(target=_trainer,
                                      args=(theirs, str(model_dir), str(out_dir), free_port(), seed, drop))
        self._process.start()
        self._expect("ready")

    def _expect(self, what: str):
        if not self._conn.poll(300):
            raise TimeoutError(f"the trainer process sent no {what!r} within 300 s")
        message, payload = self._conn.recv()
        if message == "failed":
            raise AssertionError(f"trainer process failed:\n{payload}")
        if message != what:
            raise AssertionError(f"trainer process sent {message!r}, expected {what!r}")

    def sync(self, call: Callable[[str, object], None]) -> None:
        """Let the trainer send, answering its weight-sync calls with `call(method, payload)`; blocks until done."""
        self._conn.send("go")
        try:
            while True:
                if not self._conn.poll(120):
                    raise TimeoutError("the trainer process went silent for 120 s")
                method, payload = self._conn.recv()
                if method == "done":
                    return
                if method == "failed":
                    raise AssertionError(f"trainer process failed:\n{payload}")
                try:
                    call(method, payload)
                    self._conn.send(None)
                except BaseException:
                    self._conn.send(traceback.format_exc())
        finally:
            self._process.join(30)
            if self._process.is_alive():
                self._process.kill()
