"""lightning_rlhf.evaluation.diagnosis: findings per stage from hand-made summaries."""

from lightning_rlhf.evaluation.diagnosis import Thresholds, diagnose

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


SEED1_SFT_LOSS = [
    2.93,
    1.992,
    1.504,
    1.31,
    1.228,
    1.072,
    1.051,
    1.06,
    0.996,
    0.996,
    0.905,
    0.934,
    0.984,
    0.968,
    0.909,
    0.991,
    0.979,
    0.975,
    1.035,
    1.044,
    1.06,
]


def test_sft_stopped_on_a_plateau_without_learning_is_told_to_lower_its_learning_rate():
    """The Caesar example's seed 1 (lr 3e-3): early stopping ended SFT 10 checks after its best validation loss,
    0.905, with the judge at 0.617 greedy against 0.896 for its own demonstrations: a gap of 0.279 > 0.1, so a finding
    that names the numbers and the learning rate. The same curve with SFT at 0.901 (seed 0's, above its
    demonstrations) has none. Boundary, exact in binary: demonstrations 0.75, SFT 0.625 (gap 0.125 > 0.1) is
    flagged, 0.6875 (gap 0.0625) is not. A curve whose last check is its best is not a plateau (nothing, however
    large the gap). Catches: the gap's sign flipped (seed 1 would pass), the plateau condition dropped, the
    judge's numbers ignored (seed 1's loss fell 69 % from its first check, so the loss-only test alone would pass it),
    and the check left out of CHECKS."""
    plateau = {"curves": {"sft": {"val_loss": SEED1_SFT_LOSS}}, "demonstrations": {"gold_mean": 0.896}}
    findings = diagnose({**plateau, "sft": {"gold_greedy": 0.617, "gold_sampled": 0.539}})
    assert list(findings) == ["sft"] and len(findings["sft"]) == 1
    assert "stopped improving at 0.905 (first check 2.930, last 1.060)" in findings["sft"][0]
    assert "greedy answers 0.617, its own demonstrations 0.896" in findings["sft"][0]
    assert "lower SFT's learning rate" in findings["sft"][0]
    assert diagnose({**plateau, "sft": {"gold_greedy": 0.901, "gold_sampled": 0.894}}) == {}
    boundary = {"curves": {"sft": {"val_loss": [2.0, 1.0, 1.5]}}, "demonstrations": {"gold_mean": 0.75}}
    assert list(diagnose({**boundary, "sft": {"gold_greedy": 0.625, "gold_sampled": 0.5}})) == ["sft"]
    assert diagnose({**boundary, "sft": {"gold_greedy": 0.6875, "gold_sampled": 0.5}}) == {}
    still_best = {"curves": {"sft": {"val_loss": [2.0, 1.5, 1.5]}}, "demonstrations": {"gold_mean": 0.9}}
    assert diagnose({**still_best, "sft": {"gold_greedy": 0.1, "gold_sampled": 0.1}}) == {}


def test_without_a_judge_a_plateau_barely_below_the_first_check_is_flagged():
    """No judge numbers (people ranked): the best validation loss 2.75 is above 3.0 · (1 - 0.1) = 2.7, so it barely
    moved and is flagged; a best of 1.0 (a 67 % drop) is not; nor is 2.69 (just under 2.7). Catches the comparison
    made against the last check instead of the best, and the 10 % bound read the other way."""
    flagged = diagnose({"curves": {"sft": {"val_loss": [3.0, 2.8, 2.75, 2.9]}}})
    assert list(flagged) == ["sft"] and "barely below where it started" in flagged["sft"][0]
    assert diagnose({"curves": {"sft": {"val_loss": [3.0, 1.0, 1.1]}}}) == {}
    assert diagnose({"curves": {"sft": {"val_loss": [3.0, 2.69, 2.95]}}}) == {}


def test_a_last_check_that_falls_after_early_stopping_passed_the_best_is_not_still_learning():
    """The Caesar example's seed 0 at lr 3e-4: best 0.195 at check 44, early stopping 10 checks later, the last two
    0.227 -> 0.222 (a 2.2 % drop, > 1 %). The run is past its best, not still learning: no finding (its greedy 0.913
    is level with the demonstrations' 0.896, so no plateau finding either). Catches the old check, which looked at
    the last two checks only and told this run to train longer."""
    loss = [0.3, 0.195, 0.21, 0.2, 0.22, 0.227, 0.222]
    summary = {
        "curves": {"sft": {"val_loss": loss}},
        "sft": {"gold_greedy": 0.913, "gold_sampled": 0.857},
        "demonstrations": {"gold_mean": 0.896},
    }
    assert diagnose(summary) == {}
