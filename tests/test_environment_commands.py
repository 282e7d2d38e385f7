"""``evaluate --environment``: episodes instead of single responses, scored by the environment's reward
(``rl.episodes.run_episodes``, ``commands.evaluate``)."""

from __future__ import annotations

import json

import pytest

from lightning_rlhf.commands import evaluate, sample
from lightning_rlhf.rl.episodes import EpisodeOptions, run_episodes
from lightning_rlhf.toy.tools import ToolEnv, question, tool_call_text
from tests.helpers import make_tiny_export
from tests.test_episodes import EOS, TOKENIZER, ScriptedEngine, tiny_model


class CyclingEngine(ScriptedEngine):
    """``ScriptedEngine`` whose script starts over after its last turn (one script per batch of episodes)."""

    def generate(self, *args, **kwargs):
        self.calls %= len(self.turns)
        return super().generate(*args, **kwargs)


def test_run_episodes_keeps_record_order_across_batches_and_averages_the_statistics():
    """Three records in batches of 2 then 1, each episode a call of ``add(1, 2)`` then the answer ``3``: right only
    for the record asking 1+2 (reward 1), wrong for the others (0). Each episode: 2 turns, 1 tool call, no error.
    Catches: rewards out of record order (a batch reversed or shuffled), a batch dropped (the last, short one), the
    statistics summed instead of averaged, or averaged per batch (the short batch weighed as much as the full one)."""
    records = [{"prompt": question(5, 5)}, {"prompt": question(1, 2)}, {"prompt": question(1, 2)}]
    engine = CyclingEngine(tool_call_text(1, 2) + "\n" + EOS, "3\n" + EOS)
    options = EpisodeOptions(max_new_tokens=96, max_episode_tokens=200)
    rewards, stats, texts = run_episodes(engine, tiny_model(), TOKENIZER, ToolEnv, records, options, batch_size=2)
    assert rewards == [0.0, 1.0, 1.0]
    assert stats == {"turns": 2.0, "tool_calls": 1.0, "tool_errors": 0.0, "truncated": 0.0}
    assert texts[1] == tool_call_text(1, 2) + "\n" + EOS + "<|tool|>3\n<|assistant|>3\n" + EOS


def test_evaluate_with_an_environment_scores_each_model_by_its_mean_episode_reward(tmp_path, capsys):
    """The CLI end to end on the toy tool task's held-out prompts with an untrained model: a 4-token turn never
    reaches EOS, so every episode is truncated after one turn with reward 0. Catches: the environment's records not
    reaching ``reset`` (the toy prompts' text would raise), truncation not reported, the judge's name not the class's,
    ``mean_score`` other than the mean episode reward."""
    model = make_tiny_export(tmp_path / "model")
    report = evaluate.main(
        ["--models", model, model, "--names", "a", "b", "--environment", "lightning_rlhf.toy.ToolEnv"]
        + ["--prompts", "toy:tool_held_out", "--limit", "6", "--max_new_tokens", "4", "--bootstrap", "0"]
        + ["--output", str(tmp_path / "out")]
    )
    assert report["judge"] == "lightning_rlhf.toy.tools.ToolEnv"
    assert report["mean_score"] == {"a": 0.0, "b": 0.0}
    assert report["episodes"]["b"] == {"turns": 1.0, "tool_calls": 0.0, "tool_errors": 0.0, "truncated": 1.0}
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["episodes"] == report["episodes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--environment", "lightning_rlhf.toy.ToolEnv"], "--environment needs --prompts"),
        (["--environment", "lightning_rlhf.toy.ToolEnv", "--judge", "gold"], "give exactly one judge"),
        (["--environment", "lightning_rlhf.toy.nothing", "--prompts", "toy:tool_prompts"], "cannot be imported"),
    ],
)
def test_evaluate_refuses_an_environment_without_its_records_or_beside_a_judge(tmp_path, capsys, args, message):
    """Catches: an environment evaluated on the default (reversal) prompts, two judges at once, an import error as a
    traceback instead of one line."""
    model = make_tiny_export(tmp_path / "model")
    with pytest.raises(SystemExit):
        evaluate.main(["--models", model, "--output", str(tmp_path / "out"), *args])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("environment", "expected"), [(True, 200), (False, 32)])
def test_evaluate_bounds_a_turn_by_the_episode_budget_unless_told(tmp_path, monkeypatch, environment, expected):
    """Without ``--max_new_tokens`` an episode's turn may use the whole ``--max_episode_tokens`` (a tool call of the
    toy task is ~60 byte tokens: the single-response default of 32 would cut every call short); a single response
    keeps 32. Catches: the judge's default applied to episodes, or the episode budget to single responses."""
    seen = {}

    def evaluate_models(named_models, prompts, judge, baseline, temperature, max_new_tokens, *args, **kwargs):
        seen["max_new_tokens"] = max_new_tokens
        return {}

    monkeypatch.setattr(evaluate, "evaluate_models", evaluate_models)
    monkeypatch.setattr(evaluate, "write_json_atomic", lambda *args: None)
    monkeypatch.setattr(evaluate, "save_figure_atomic", lambda *args: None)
    monkeypatch.setattr(evaluate, "plot_win_rates", lambda report: None)
    monkeypatch.setattr(evaluate, "format_table", lambda report: "")
    judge = ["--environment", "lightning_rlhf.toy.ToolEnv", "--prompts", "toy:tool_held_out"] if environment else []
    evaluate.main(
        ["--models", str(tmp_path), *(judge or ["--judge", "gold"]), "--max_episode_tokens", "200"]
        + ["--output", str(tmp_path / "out")]
    )
    assert seen["max_new_tokens"] == expected


def test_episode_records_merge_identical_episodes_keeping_the_first_reward_and_count_ties():
    """Prompt p: episodes (A, B, A) rewarded (1, 0, 0): A's first reward, 1, is kept, so A ranks 0 and B 1, and one
    duplicate is merged. Prompt q: (C, C) both 0, one response left: all tied, left out and counted. Catches: the last
    duplicate's reward kept (A and B would tie at 0 and p be dropped), duplicates not merged, a tied prompt written."""
    records, report = sample.episode_records(["p", "q"], [["A", "B", "A"], ["C", "C"]], [[1, 0, 0], [0, 0]], 0.0, 0)
    assert records == [{"prompt": "p", "responses": ["A", "B"], "ranks": [0, 1]}]
    assert (report.prompts, report.written, report.all_tied, report.merged_duplicates) == (2, 1, 1, 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--environment", "lightning_rlhf.toy.ToolEnv", "--judge", "gold"], "drop --judge"),
        (["--environment", "lightning_rlhf.toy.ToolEnv", "--k", "1"], "--k must be at least 2"),
        (["--environment", "lightning_rlhf.toy.nothing"], "cannot be imported"),
    ],
)
def test_sample_refuses_an_environment_beside_a_judge_or_with_one_episode(tmp_path, capsys, args, message):
    """Catches: two rankings at once, a single episode "ranked", an import error as a traceback."""
    model = make_tiny_export(tmp_path / "model")
    with pytest.raises(SystemExit):
        sample.main(["--model", model, "--prompts", "toy:tool_prompts", "--output", str(tmp_path / "o.jsonl"), *args])
    assert message in capsys.readouterr().err
