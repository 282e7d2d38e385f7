"""Win rates, Bradley–Terry / Elo ratings, bootstrap intervals and best-of-n: the maths by hand, then the
`evaluate` command on two tiny models."""

import json
import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.cli import main
from lightning_rlhf.commands.evaluate import evaluate_models
from lightning_rlhf.evaluation.ratings import (
    best_of_n,
    best_of_n_kl,
    bootstrap_ratings,
    bradley_terry,
    elo_ratings,
    rating_report,
    win_rate_matrix,
)
from tests.helpers import make_tiny_export, run_cli

# 3 models x 4 prompts; prompt 1 is a three-way tie.
SCORES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0], [2.0, 2.0, 2.0, 2.0]])


def exact(actual, expected) -> None:
    """Equal to the last bit: for values that are exact binary fractions."""
    as_float64 = torch.as_tensor(expected, dtype=torch.float64)
    assert_close(torch.as_tensor(actual, dtype=torch.float64), as_float64, rtol=0, atol=0)


def test_win_rate_matrix_counts_a_tie_as_half_a_win():
    """Per prompt, model 0 vs 1: 1>0 win, 2=2 half, 3<5 loss, 4>1 win -> 2.5/4 = 5/8.
    0 vs 2: 1<2 loss, tie half, 3>2 win, 4>2 win -> 5/8.  1 vs 2: 0<2 loss, tie half, 5>2 win, 1<2 loss -> 3/8.
    Below the diagonal: 1 minus the mirror entry; the diagonal is all ties, 1/2."""
    win_rates = win_rate_matrix(SCORES)
    exact(win_rates, [[1 / 2, 5 / 8, 5 / 8], [3 / 8, 1 / 2, 3 / 8], [3 / 8, 5 / 8, 1 / 2]])
    exact(win_rates + win_rates.T, torch.ones(3, 3))


def test_bradley_terry_two_models_is_the_log_odds_of_the_counts_plus_the_prior():
    """Two models: the likelihood equation W_1 = n p_1 / (p_1 + p_2) gives p_1 / p_2 = W_1 / W_2.
    3 wins vs 1, no prior: θ_1 − θ_2 = log 3. The default prior adds 0.5 virtual wins to each side:
    3.5 vs 1.5, so log(7/3). The result is centred: θ = ±(difference) / 2."""
    wins = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    assert_close(bradley_terry(wins, prior=0), torch.tensor([1, -1], dtype=torch.float64) * math.log(3) / 2)
    assert_close(bradley_terry(wins), torch.tensor([1, -1], dtype=torch.float64) * math.log(7 / 3) / 2)


def test_bradley_terry_recovers_the_strengths_that_generated_the_counts():
    """Strengths p = (1, 2, 4), θ = (0, log 2, log 4), 12 games per pair, expected wins 12 p_i / (p_i + p_k):
    0 vs 1: 4 and 8; 0 vs 2: 2.4 and 9.6; 1 vs 2: 4 and 8. Expected counts satisfy the likelihood equations
    exactly, so the MLE is θ itself, centred: (−log 2, 0, log 2). The diagonal holds self-ties, as
    win_rate_matrix times p gives them; they cancel out of the MM update."""
    wins = torch.tensor([[6.0, 4.0, 2.4], [8.0, 6.0, 4.0], [9.6, 8.0, 6.0]])
    assert_close(bradley_terry(wins, prior=0), torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * math.log(2))


def test_bradley_terry_keeps_a_model_that_never_wins_or_never_loses_finite():
    """Model 0 loses all its 10 games: without a prior its strength is 0 (θ = −inf), which is refused; with the
    default prior it is finite and the lowest. Mirrored, a model that never loses is finite and the highest."""
    never_wins = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 3.0], [5.0, 2.0, 0.0]])
    theta = bradley_terry(never_wins)
    assert torch.isfinite(theta).all() and theta[0] < theta[1:].min() - 1
    with pytest.raises(ValueError, match="never wins or never loses"):
        bradley_terry(never_wins, prior=0)
    theta = bradley_terry(never_wins.T)
    assert torch.isfinite(theta).all() and theta[0] > theta[1:].max() + 1


def test_elo_gives_400_points_for_ten_to_one_odds_and_the_baseline_1000():
    """θ differences of ln 10 (10:1 odds) are 400 points: θ = (0, ln 10, −ln 10 / 2) -> (1000, 1400, 800);
    with model 1 as baseline everything moves down by 400."""
    theta = torch.tensor([0.0, math.log(10), -math.log(10) / 2], dtype=torch.float64)
    assert_close(elo_ratings(theta), torch.tensor([1000.0, 1400.0, 800.0], dtype=torch.float64))
    assert_close(elo_ratings(theta, baseline_index=1), torch.tensor([600.0, 1000.0, 400.0], dtype=torch.float64))


def test_rating_report_uses_win_counts_and_names_every_entry():
    """a beats b on 3 of 4 prompts: counts 3 vs 1, with the prior 3.5 vs 1.5, so Elo(a) − Elo(b) =
    400 log10(7/3) = 147.19 with b the baseline at 1000. (Rates 0.75 / 0.25 instead of counts would give
    400 log10(5/3) = 88.74.) Mean scores 0.75 and 0.25; win rate vs b 3/4 and 1/2."""
    report = rating_report(["a", "b"], [[1, 1, 1, 0], [0, 0, 0, 1]], baseline="b", bootstrap=0)
    assert report["models"] == ["a", "b"] and report["baseline"] == "b" and report["prompts"] == 4
    assert report["elo"]["b"] == 1000 and report["elo"]["a"] == pytest.approx(1000 + 400 * math.log10(7 / 3))
    assert report["mean_score"] == {"a": 0.75, "b": 0.25}
    assert report["win_rate_vs_baseline"] == {"a": 0.75, "b": 0.5}
    assert report["win_rate_vs_baseline_ci"] == report["elo_ci"] == {"a": None, "b": None}
    json.dumps(report)
    with pytest.raises(ValueError, match="baseline 'c'"):
        rating_report(["a", "b"], [[1], [0]], baseline="c")


def test_bootstrap_is_seeded_and_its_intervals_hold_the_estimates():
    """Same seed, same intervals; another seed, others. Each interval contains the full-data estimate, and the
    baseline's own are points: win rate 1/2 and Elo 1000 in every resample."""
    scores = torch.rand(3, 60, generator=torch.Generator().manual_seed(0)) + torch.tensor([[0.0], [0.2], [0.4]])
    intervals = bootstrap_ratings(scores, 200, seed=3)
    for same, other in zip(intervals, bootstrap_ratings(scores, 200, seed=3), strict=True):
        exact(same, other)
    assert not torch.equal(intervals.elo, bootstrap_ratings(scores, 200, seed=4).elo)
    report = rating_report(["a", "b", "c"], scores, bootstrap=200, seed=3)
    for name in "abc":
        low, high = report["elo_ci"][name]
        assert low <= report["elo"][name] <= high
        low, high = report["win_rate_vs_baseline_ci"][name]
        assert low <= report["win_rate_vs_baseline"][name] <= high
    assert report["elo_ci"]["a"] == [1000, 1000] and report["win_rate_vs_baseline_ci"]["a"] == [0.5, 0.5]


def test_bootstrap_win_rate_of_a_model_that_always_wins_is_exactly_one():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    exact(bootstrap_ratings(scores, 100).win_rate_vs_baseline, [[0.5, 0.5], [1.0, 1.0]])


def test_bootstrap_interval_has_the_binomial_width():
    """b beats a on exactly 200 of 400 prompts. Resampling prompts, the win rate is a binomial proportion with
    standard error sqrt(0.25 / 400) = 0.025, so the 95% interval is about 0.5 ± 1.96 · 0.025 = 0.5 ± 0.049
    (a 90% interval would be ± 0.041, resampling models instead of prompts would give no width at all)."""
    scores = torch.stack([torch.zeros(400), torch.tensor([1.0, -1.0]).repeat(200)])
    low, high = bootstrap_ratings(scores, 2000).win_rate_vs_baseline[1].tolist()
    assert 0.045 < 0.5 - low < 0.053 and 0.045 < high - 0.5 < 0.053


def test_best_of_n_kl_is_log_n_minus_n_minus_one_over_n():
    """n = 1: log 1 − 0 = 0. n = 2: log 2 − 1/2 = 0.193147. n = 16: 4 log 2 − 15/16 = 1.835089."""
    assert best_of_n_kl(1) == 0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(1.835088722)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_scores_the_selectors_pick_with_the_judge():
    """Prompt 0: selector (0.1, 0.5, 0.3), judge (1.0, 0.0, 0.6). Prompt 1: selector (0.9, 0.9, 0.95), judge
    (0.2, 0.8, 0.4). n = 1: samples 0, 0 -> (1.0 + 0.2) / 2 = 0.6. n = 2: sample 1 (0.5 > 0.1), and the tie
    0.9 = 0.9 goes to the earlier sample 0 -> (0.0 + 0.2) / 2 = 0.1. n = 3: samples 1, 2 -> (0.0 + 0.4) / 2 =
    0.2. The selector, not the judge, picks: the judge's own best would give 0.6, 0.9, 0.9."""
    selector = [[0.1, 0.5, 0.3], [0.9, 0.9, 0.95]]
    judge = [[1.0, 0.0, 0.6], [0.2, 0.8, 0.4]]
    assert_close(best_of_n(selector, judge), torch.tensor([0.6, 0.1, 0.2], dtype=torch.float64))


def test_evaluate_models_samples_every_model_under_the_same_seed(tiny_model_dir):
    """The same model twice: seeded alike, it gives the same responses, so every prompt ties (byte-sum judge,
    which tells apart almost any two different responses): win rates all 1/2, both Elo 1000."""
    prompts = [f"Reverse: {word}\n" for word in ["abc", "hello", "xyz", "lightning"]]
    report = evaluate_models(
        {"a": tiny_model_dir, "b": tiny_model_dir},
        prompts,
        lambda prompt, response: sum(response.encode()),
        max_new_tokens=6,
        bootstrap=20,
    )
    assert report["win_rate_matrix"] == [[0.5, 0.5], [0.5, 0.5]]
    assert report["elo"] == {"a": 1000, "b": 1000} and report["prompts"] == 4


@pytest.mark.slow
def test_evaluate_cli_writes_the_report_and_the_figure(tmp_path):
    a, b = make_tiny_export(tmp_path / "a", seed=0), make_tiny_export(tmp_path / "b", seed=1)
    out = tmp_path / "eval"
    result = run_cli(
        "evaluate",
        "--models",
        a,
        b,
        "--names",
        "a",
        "b",
        "--toy_held_out",
        "8",
        "--max_new_tokens",
        "4",
        "--judge",
        "gold",
        "--bootstrap",
        "50",
        "--output",
        str(out),
        cwd=tmp_path,
    )
    report = json.loads((out / "evaluation.json").read_text())
    assert report["models"] == ["a", "b"] and report["baseline"] == "a" and report["prompts"] == 8
    win_rates = torch.tensor(report["win_rate_matrix"], dtype=torch.float64)
    assert win_rates.shape == (2, 2)
    exact(win_rates.diagonal(), [0.5, 0.5])
    exact(win_rates + win_rates.T, torch.ones(2, 2))
    for key in ("mean_score", "win_rate_vs_baseline", "win_rate_vs_baseline_ci", "elo", "elo_ci"):
        assert set(report[key]) == {"a", "b"}, key
    assert len(report["elo_ci"]["b"]) == 2 and report["elo"]["a"] == 1000
    assert (out / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "win_rates.png"]  # no temporary left
    assert "win rate vs a" in result.stdout


def test_evaluate_cli_names_a_missing_model_directory(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--models", str(missing), "--judge", "gold", "--output", str(tmp_path / "out")])
    assert exit_info.value.code != 0 and str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_wants_exactly_one_judge(tiny_model_dir, tmp_path, capsys):
    common = ["evaluate", "--models", tiny_model_dir, "--output", str(tmp_path / "out")]
    for judges in (["--judge", "gold", "--reward_fn", "lightning_rlhf.toy.gold_score"], []):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *judges])
        assert exit_info.value.code != 0 and "exactly one judge" in capsys.readouterr().err
