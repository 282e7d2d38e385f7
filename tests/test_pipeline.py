"""scripts/pipeline.py, the README's main job: every stage through the CLI, evaluated on held-out prompts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_pipeline_chains_every_stage_and_round_and_reports_gold_scores_win_rates_and_plots(tmp_path):
    """A short run (20 steps a stage, 64 ranked prompts a round; labeller noise breaks the ties of a barely trained
    model's samples) with two rounds and the over-optimised run, seed 1 (every stage's model and data seeded
    alike): each stage must read the previous stage's export (round 2's reward model starts from the first round's,
    round 2's PPO from the first round's policy, with SFT as reference), and the summary must hold the evaluation of
    every model, the win rates and Elo against SFT, both reward models' accuracy and the best-of-n curve."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pipeline.py"), "--outputs", str(tmp_path), "--max_steps", "20",
         "--k", "4", "--noise", "0.2", "--eval_prompts", "16", "--rank_prompts", "64", "--rounds", "2",
         "--overoptimization", "--seeds", "1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "pipeline" / "summary.json").read_text())
    models = ("sft", "ppo", "ppo_round2", "ppo_gold_reward", "dpo", "ppo_overoptimized")
    for stage in models:
        entry = summary[stage]
        assert 0 <= entry["gold_greedy"] <= 1 and 0 <= entry["gold_sampled"] <= 1
        assert 0 <= entry["win_rate_vs_sft"] <= 1
        low, high = entry["elo_ci"]
        assert low <= entry["elo"] <= high
    assert summary["sft"]["win_rate_vs_sft"] == 0.5 and summary["sft"]["elo"] == 1000
    for name in ("reward_model", "reward_model_round2"):
        assert summary[name]["rm_eval_pairs"] > 0
    assert summary["best_of_n"]["n"] == list(range(1, 17)) and len(summary["best_of_n"]["gold"]) == 16
    assert summary["held_out_prompts"] == 16 and set(summary["seconds"]) == {
        "sft", "comparisons", "rm", "ppo", "ppo_gold_reward", "ppo_overoptimized", "dpo",
        "comparisons_round2", "rm_round2", "ppo_round2", "evaluation",
    }  # fmt: skip
    assert AutoConfig.from_pretrained(tmp_path / "rm" / "hf").architectures == ["LlamaForSequenceClassification"]
    for stage in ("ppo", "ppo_round2", "ppo_gold_reward", "dpo"):
        assert AutoConfig.from_pretrained(tmp_path / stage / "hf").architectures == ["LlamaForCausalLM"]
    round2 = yaml.safe_load((tmp_path / "ppo_round2" / "tensorboard" / "version_0" / "hparams.yaml").read_text())
    assert round2["model_name_or_path"] == str(tmp_path / "ppo" / "hf")
    assert round2["ref_model_name_or_path"] == str(tmp_path / "sft" / "hf")
    assert round2["reward_model_name_or_path"] == str(tmp_path / "rm_round2" / "hf")
    rm_round2 = yaml.safe_load((tmp_path / "rm_round2" / "tensorboard" / "version_0" / "hparams.yaml").read_text())
    assert rm_round2["model_name_or_path"] == str(tmp_path / "rm" / "hf")  # warm start from round 1's reward model
    rounds = (tmp_path / "pipeline").glob("comparisons*.jsonl")
    lines = {path.name: len(path.read_text().splitlines()) for path in rounds}
    assert lines["comparisons_up_to_round2.jsonl"] == lines["comparisons.jsonl"] + lines["comparisons_round2.jsonl"]
    for png in ("overoptimization.png", "win_rates.png"):
        assert (tmp_path / "pipeline" / png).read_bytes().startswith(PNG)
    assert "Gold-judge scores on held-out prompts" in result.stdout


def test_seeds_are_aggregated_as_means_with_min_max_spreads():
    """Two seeds: SFT gold sampled 0.8 and 0.9 -> mean 0.85, spread [0.8, 0.9]; non-numbers (intervals, curves)
    stay in the per-seed runs only."""
    from scripts.pipeline import aggregate

    common = {"held_out_prompts": 3, "sampling_temperature": 1.0, "labeller_noise": 0.0, "k": 8,
              "ranked_prompts_per_round": 10, "rounds": 1, "curves": {}, "best_of_n": {}}  # fmt: skip
    runs = [{**common, "seed": seed, "sft": {"gold_sampled": score, "elo_ci": [1, 2]},
             "reward_model": {"rm_pairwise_accuracy_vs_gold": accuracy}}
            for seed, score, accuracy in ((0, 0.8, 0.7), (1, 0.9, 0.9))]  # fmt: skip
    summary = aggregate(runs)
    assert summary["seeds"] == [0, 1] and summary["runs"] == runs
    assert set(summary["sft"]) == {"gold_sampled", "gold_sampled_spread"}
    assert summary["sft"]["gold_sampled"] == pytest.approx(0.85) and summary["sft"]["gold_sampled_spread"] == [0.8, 0.9]
    assert summary["reward_model"]["rm_pairwise_accuracy_vs_gold"] == pytest.approx(0.8)
    assert "curves" not in summary and "best_of_n" not in summary
