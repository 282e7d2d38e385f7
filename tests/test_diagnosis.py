"""lightning_rlhf.diagnosis: findings per stage from hand-made summaries."""

from lightning_rlhf.diagnosis import Thresholds, diagnose

SFT = {"gold_greedy": 0.636, "gold_sampled": 0.512}


def test_a_healthy_run_has_no_findings():
    """Reward model at 0.88 (>= 0.7), PPO better both ways, KL 1.3 (<= 5), empty share flat, SFT loss flat at the end
    (1.000 -> 0.995: a 0.5 % drop, under 1 %). Catches a check that fires on good numbers (e.g. a flipped
    comparison)."""
    summary = {
        "sft": SFT,
        "ppo": {"gold_greedy": 0.70, "gold_sampled": 0.60},
        "reward_model": {"rm_pairwise_accuracy_vs_gold": 0.88, "rm_eval_pairs": 1395},
        "curves": {"sft": {"val_loss": [1.2, 1.0, 0.995]}, "ppo": {"kl": [0.1, 1.3], "empty_fraction": [0.0, 0.02]}},
    }
    assert diagnose(summary) == {}


def test_the_issues_run_is_diagnosed_stage_by_stage():
    """The issue's numbers: RM 0.679 < 0.7; PPO greedy 0.625 - 0.636 = -0.011 (< -0.005) while sampled 0.558 - 0.512
    = +0.046 (> 0.005): a trade; GRPO worse both ways (-0.017, -0.010); DPO better both ways: nothing. PPO ends at KL
    6.0 > 5; GRPO's empty share 0.01 -> 0.10, a rise of 0.09 > 0.05; SFT's loss 1.40 -> 1.34 is a 4.3 % drop > 1 %.
    Catches: a check dropped from CHECKS, the greedy/sampled signs swapped (DPO would be flagged), the KL or empty
    share read from the first point instead of the last, and findings filed under the wrong stage."""
    summary = {
        "sft": SFT,
        "ppo": {"gold_greedy": 0.625, "gold_sampled": 0.558},
        "grpo": {"gold_greedy": 0.619, "gold_sampled": 0.502},
        "dpo": {"gold_greedy": 0.657, "gold_sampled": 0.533},
        "reward_model": {"rm_pairwise_accuracy_vs_gold": 0.679, "rm_eval_pairs": 1395},
        "curves": {
            "sft": {"val_loss": [2.0, 1.40, 1.34]},
            "ppo": {"kl": [0.5, 6.0], "empty_fraction": [0.0, 0.0]},
            "grpo": {"kl": [9.0, 1.0], "empty_fraction": [0.01, 0.10]},
        },
    }
    findings = diagnose(summary)
    assert set(findings) == {"sft", "reward_model", "ppo", "grpo"}
    assert "still falling" in findings["sft"][0] and "1.400 -> 1.340" in findings["sft"][0]
    assert "0.679 of 1395" in findings["reward_model"][0]
    assert len(findings["ppo"]) == 2
    assert "trades greedy" in findings["ppo"][0] and "greedy -0.011, sampled +0.046" in findings["ppo"][0]
    assert "6.00 nats" in findings["ppo"][1]
    assert len(findings["grpo"]) == 2
    assert "worse than SFT both ways" in findings["grpo"][0] and "0.010 to 0.100" in findings["grpo"][1]


def test_thresholds_are_the_users_and_missing_numbers_are_skipped():
    """With max_kl 1.0 a final KL of 1.3 is flagged; a run without SFT scores, reward model or curves (e.g.
    --stages rm) gives no finding rather than an error. Catches the default bound hard-coded in a check and a check
    that indexes a missing key."""
    summary = {"ppo": {"gold_greedy": 0.5, "gold_sampled": 0.5}, "curves": {"ppo": {"kl": [1.3]}}}
    assert diagnose(summary) == {}
    assert list(diagnose(summary, Thresholds(max_kl=1.0))) == ["ppo"]
    assert diagnose({"seed": 0}) == {}
