"""scripts/pipeline.py, the README's main job: every stage through the CLI, evaluated on held-out prompts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_chains_sft_sample_rm_ppo_dpo_and_reports_gold_scores(tmp_path):
    """A short run (20 steps a stage; labeller noise breaks the ties of a barely trained model's samples): each
    stage must read the previous stage's export, and the summary must hold the evaluation of all four models."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pipeline.py"), "--outputs", str(tmp_path), "--max_steps", "20",
         "--k", "4", "--noise", "0.2", "--eval_prompts", "16"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "pipeline" / "summary.json").read_text())
    for stage in ("sft", "ppo", "ppo_gold_reward", "dpo"):
        assert 0 <= summary[stage]["gold_greedy"] <= 1 and 0 <= summary[stage]["gold_sampled"] <= 1
    assert summary["reward_model"]["rm_eval_pairs"] > 0
    assert summary["held_out_prompts"] == 16 and set(summary["seconds"]) == {
        "sft",
        "sample",
        "reward_model",
        "ppo",
        "ppo_gold_reward",
        "dpo",
        "evaluation",
    }
    assert AutoConfig.from_pretrained(tmp_path / "rm" / "hf").architectures == ["LlamaForSequenceClassification"]
    for stage in ("ppo", "ppo_gold_reward", "dpo"):
        assert AutoConfig.from_pretrained(tmp_path / stage / "hf").architectures == ["LlamaForCausalLM"]
    assert len((tmp_path / "pipeline" / "comparisons.jsonl").read_text().splitlines()) > 0
    assert "Gold-judge scores on held-out prompts" in result.stdout
