"""Critic-free estimators and loss aggregation against hand-computed values: GRPO, Dr. GRPO, RLOO, REINFORCE++,
``token_mean`` / ``seq_mean_token_sum`` / ``seq_mean_token_mean``, and k3's gradient as GRPO's KL loss term."""

import math

import pytest
import torch

from lightning_rlhf.losses.policy import (
    advantages_and_returns,
    aggregate_loss,
    discounted_returns,
    group_advantages,
    kl_penalty,
    ppo_policy_loss,
    reinforce_pp_advantages,
)


def test_grpo_divides_by_the_groups_unbiased_std():
    """Group (1, 2, 3, 6): mean 3, deviations (-2, -1, 0, 3), Σ d² = 14, unbiased std √(14/3) = 2.160247 (the
    biased √(14/4) = 1.870829 would give -1.069045 first), so with eps 0: (-0.925820, -0.462910, 0, 1.388730).
    Group (0, 1) (G = 2 is another call): deviations ±0.5, unbiased std √(0.5/1) = 0.707107: ±0.707107."""
    out = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4, "grpo", eps=0.0)
    torch.testing.assert_close(out, torch.tensor([-0.925820, -0.462910, 0.0, 1.388730]))
    out = group_advantages(torch.tensor([0.0, 1.0, 5.0, 5.0]), 2, "grpo", eps=0.0)
    torch.testing.assert_close(out[:2], torch.tensor([-0.707107, 0.707107]))


def test_grpo_eps_is_added_to_the_std_not_the_variance():
    """Group (0, 2): deviations ±1, unbiased std √2 = 1.414214; eps 0.5: ±1 / 1.914214 = ±0.522408 (eps inside
    the root would give ±1 / √2.5 = ±0.632456)."""
    out = group_advantages(torch.tensor([0.0, 2.0]), 2, "grpo", eps=0.5)
    torch.testing.assert_close(out, torch.tensor([-0.522408, 0.522408]))


def test_dr_grpo_only_subtracts_the_group_mean():
    """Groups (1, 2, 3, 6) and (4, 4, 4, 8): means 3 and 5, so (-2, -1, 0, 3) and (-1, -1, -1, 3): no division."""
    out = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 8.0]), 4, "dr_grpo")
    torch.testing.assert_close(out, torch.tensor([-2.0, -1.0, 0.0, 3.0, -1.0, -1.0, -1.0, 3.0]))


def test_rloo_baseline_is_the_mean_of_the_other_responses_only():
    """Group (1, 2, 3, 6): others' means 11/3, 10/3, 3, 2, so (1 - 11/3, 2 - 10/3, 0, 4) = (-8/3, -4/3, 0, 4), i.e.
    G/(G-1) · (s - mean); a mean including the response itself would give (-2, -1, 0, 3). With ties, (2, 2, 5):
    others' means 3.5, 3.5, 2, so (-1.5, -1.5, 3). G = 2, (0, 1): each minus the other, (-1, 1)."""
    out = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4, "rloo")
    torch.testing.assert_close(out, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))
    torch.testing.assert_close(
        group_advantages(torch.tensor([2.0, 2.0, 5.0]), 3, "rloo"), torch.tensor([-1.5, -1.5, 3.0])
    )
    torch.testing.assert_close(group_advantages(torch.tensor([0.0, 1.0]), 2, "rloo"), torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_a_group_of_equal_scores_gives_zero_advantage_and_no_nan(estimator):
    """0.1 is not exact in float32: its group mean can differ from it by an ulp, and GRPO's std is then ~1e-9, so
    only eps keeps the quotient near 0. The other group (0, 1, 2) still gets its signal."""
    out = group_advantages(torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 2.0]), 3, estimator)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:3], torch.zeros(3), atol=1e-5, rtol=0)
    assert out[3] < 0 < out[5]


def test_group_advantages_refuses_lone_responses_partial_groups_and_unknown_estimators():
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.zeros(5), 2, "grpo")
    with pytest.raises(ValueError, match="'ppo' is not one of"):
        group_advantages(torch.zeros(4), 2, "ppo")


def test_discounted_returns_hand_computed_and_zero_on_padding():
    """γ = 0.5, rewards (1, 2, 4 | 9): G_2 = 4, G_1 = 2 + 0.5·4 = 4, G_0 = 1 + 0.5·4 = 3; padding 0 and unread."""
    returns = discounted_returns(torch.tensor([[1.0, 2.0, 4.0, 9.0]]), torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[3.0, 4.0, 4.0, 0.0]]))


def test_reinforce_pp_whitens_returns_over_the_batchs_real_tokens_only():
    """β = 0.5, γ = 1, scores (1, 2). Row 0: KL (0.2, 0.4 | 9), 2 real tokens: rewards (-0.1, -0.2 + 1 = 0.8 | 0),
    returns (0.7, 0.8 | 0). Row 1: KL (0, 0.2, 0.4): rewards (0, -0.1, 1.8), returns (1.7, 1.7, 1.8).
    Over the 5 real returns: mean 6.7 / 5 = 1.34, deviations (-0.64, -0.54 | 0.36, 0.36, 0.46), Σ d² = 1.172,
    unbiased var 1.172 / 4 = 0.293, std 0.541295: (-1.182349, -0.997607 | 0.665071, 0.665071, 0.849814), 0 on the
    padding. Counting the padding's 0 as a sixth token would move the mean to 1.116667."""
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.2, 0.4, 9.0], [0.0, 0.2, 0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = reinforce_pp_advantages(scores, kl, mask, kl_coef=0.5, gamma=1.0)
    expected = torch.tensor([[-1.182349, -0.997607, 0.0], [0.665071, 0.665071, 0.849814]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


LOSSES = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 50.0, 50.0, 50.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [("token_mean", 2.5), ("seq_mean_token_sum", 1.25), ("seq_mean_token_mean", 3.0)],
)
def test_loss_aggregations_hand_computed(aggregation, expected):
    """Real tokens (1, 2, 3) and (4), the rest padding. token_mean: (1 + 2 + 3 + 4) / 4 = 2.5; seq_mean_token_sum
    over max_length 4: (6/4 + 4/4) / 2 = 1.25; seq_mean_token_mean: (2 + 4) / 2 = 3."""
    torch.testing.assert_close(aggregate_loss(LOSSES, MASK, aggregation, max_length=4), torch.tensor(expected))


def test_seq_mean_token_sum_needs_a_constant_length_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(LOSSES, MASK, "seq_mean_token_sum")
    with pytest.raises(ValueError, match="'sum' is not one of"):
        aggregate_loss(LOSSES, MASK, "sum")


def test_policy_loss_uses_the_aggregation():
    """Ratio 1 everywhere (no clipping): per-token loss -A. A = -LOSSES, so the loss is the aggregation of LOSSES:
    seq_mean_token_mean (2 + 4) / 2 = 3, where the token mean would be 2.5."""
    logprobs = torch.zeros(2, 4)
    loss, _ = ppo_policy_loss(logprobs, logprobs, -LOSSES, MASK, aggregation="seq_mean_token_mean")
    torch.testing.assert_close(loss, torch.tensor(3.0))


def test_k3_as_a_loss_term_pulls_the_policy_towards_the_reference():
    """GRPO's KL loss k3 = eᵘ - 1 - u, u = log π_ref - log π, has d k3 / d log π = 1 - π_ref / π. With π = 1/2 and
    π_ref = 1/4: 1 - 0.5 = 0.5 > 0 (descent lowers log π towards the reference); with π_ref = 1 (u = ln 2): 1 - 2 = -1.
    The token mean over the two tokens halves each."""
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    ref_logprobs = torch.tensor([[math.log(0.25), 0.0]])
    aggregate_loss(kl_penalty(logprobs, ref_logprobs, "k3"), torch.ones(1, 2)).backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.25, -0.5]]))


WHITENED = [[-0.755929, -0.377964, 0.0], [1.133893, 0.0, 0.0]]  # (0, 0.5, 2.5): mean 1, unbiased std √1.75


@pytest.mark.parametrize(
    ("estimator", "whiten", "advantages", "returns"),
    [
        ("gae", False, [[0.0, 0.5, 0.0], [2.5, 0.0, 0.0]], [[0.0, 0.5, 0.0], [2.5, 0.0, 0.0]]),
        ("gae", True, WHITENED, [[0.0, 0.5, 0.0], [2.5, 0.0, 0.0]]),
        ("reinforce_pp", False, WHITENED, None),
        ("grpo", False, [[-0.707067, -0.707067, 0.0], [0.707067, 0.0, 0.0]], None),
        ("dr_grpo", False, [[-1.25, -1.25, 0.0], [1.25, 0.0, 0.0]], None),
        ("rloo", False, [[-2.5, -2.5, 0.0], [2.5, 0.0, 0.0]], None),
    ],
)
def test_each_advantage_estimator_is_its_table_entry(estimator, whiten, advantages, returns):
    """One group of two responses, 2 and 1 tokens, scores (1, 3), KL 0.5 on every token, β = 1, values 0,
    γ = λ = 1. Per-token rewards (``gae``, ``reinforce_pp``): -0.5 per token plus the score on the last, rows
    (-0.5, 0.5) and (2.5); returns to go (0, 0.5) and (2.5), which GAE with zero values gives as both advantages
    and returns; whitened over the 3 real tokens (mean 1, unbiased std √1.75 = 1.322876): (-0.755929, -0.377964)
    and (1.133893), which REINFORCE++ always gives and GAE with ``whiten``, its returns unwhitened. Group
    estimators on the sequence rewards 1 - 1 = 0 and 3 - 0.5 = 2.5: ``rloo`` ∓2.5 (the other one's score),
    ``dr_grpo`` ∓1.25 (the mean 1.25), ``grpo`` ∓1.25 / (1.767767 + 1e-4) = ∓0.707067, on every real token.
    Catches an entry bound to the wrong estimator, ``whiten`` ignored or applied to the returns, a KL left out of
    the group rewards, or returns given where there are none."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out_advantages, out_returns = advantages_and_returns(
        estimator,
        torch.tensor([1.0, 3.0]),
        torch.full((2, 3), 0.5),
        mask,
        kl_coef=1.0,
        values=torch.zeros(2, 3),
        gamma=1.0,
        lam=1.0,
        whiten=whiten,
        group_size=2,
    )
    torch.testing.assert_close(out_advantages, torch.tensor(advantages), atol=1e-5, rtol=0)
    if returns is None:
        assert out_returns is None
    else:
        torch.testing.assert_close(out_returns, torch.tensor(returns))


def test_an_unknown_advantage_estimator_is_refused_with_the_choices():
    with pytest.raises(
        ValueError, match=r"advantage_estimator='a2c' is not one of \['gae', 'grpo', 'dr_grpo', 'rloo', "
    ):
        advantages_and_returns("a2c", torch.zeros(2), torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool), 0.1)
