"""The held-out record of a run: the evaluation of the model before its warm-up is kept in the model cache under a
key of everything it depends on, and a later run records it from there instead of playing it again."""

from __future__ import annotations

import json
from pathlib import Path

from longhaul.config import load_config
from longhaul.driver import TrainingRun
from longhaul.held_out import BEFORE_WARMUP, before_warmup_cache


def config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"train.run_dir={tmp_path / 'runs'}", f"model.cache_dir={tmp_path / 'models'}",
                              *overrides])


def test_the_cache_key_changes_with_anything_the_evaluation_depends_on_and_a_given_model_path_has_none(tmp_path):
    model = tmp_path / "models" / "tiny-0123456789abcdef"
    base = before_warmup_cache(config(tmp_path), model)
    assert base == before_warmup_cache(config(tmp_path, "run_name=another"), model)
    assert base.parent == tmp_path / "models" / "evaluations" and base.name.startswith(model.name)
    changed = [before_warmup_cache(config(tmp_path, override), model) for override in (
        "evaluation.tasks=10", "evaluation.hops=[1]", "evaluation.temperature=0.5", "agent.max_turns=8",
        "world.seed=1", "tools.search_top_k=3", "engine.kv_block_size=64")]
    changed.append(before_warmup_cache(config(tmp_path), model.with_name("tiny-fedcba9876543210")))
    assert len({base, *changed}) == len(changed) + 1
    assert before_warmup_cache(config(tmp_path, f"model.path={model}"), model) is None


def test_a_run_records_the_kept_evaluation_of_its_model_before_the_warm_up_without_playing_it(tmp_path, capsys):
    settings = config(tmp_path, "run_name=kept")
    model = tmp_path / "models" / "tiny-0123456789abcdef"
    figures = {"episodes": 125, "success_rate": 0.0, "mean_f1": 0.0, "mean_tool_calls": 51.2, "max_tool_calls": 64,
               "finish_reasons": {"max_turns": 125}, "success_by_hops": {"1": 0.0, "2": 0.0}, "versions": [0, 0],
               "seconds": 180.0}
    cache = before_warmup_cache(settings, model)
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps(figures))
    run = TrainingRun(settings)
    run.output_dir.mkdir(parents=True)
    run._evaluate_before_warmup(model)  # no engine can start on a model directory that does not exist
    [record] = [json.loads(line) for line in (run.output_dir / "evaluations.jsonl").read_text().splitlines()]
    assert {k: record.pop(k) for k in ("step", "phase", "actor_id")} == {"step": 0, "phase": BEFORE_WARMUP,
                                                                         "actor_id": "driver"}
    record.pop("time")
    assert record == figures
    assert "as evaluated by an earlier run" in capsys.readouterr().out
