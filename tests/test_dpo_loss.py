"""dpo_loss: every variant against numbers worked out by hand, and the value where policy equals reference."""

import math

import pytest
import torch

from lightning_rlhf.losses.preference import dpo_loss, log_odds

# Two examples. Log-ratios policy - reference: chosen (-1) - (-2) = 1 and (-2) - (-2) = 0;
# rejected (-3) - (-2) = -1 and (-1) - (-2) = 1. So d = 1 - (-1) = 2 and d = 0 - 1 = -1.
# With beta = 0.5: beta * d = 1 and -0.5.
POLICY_CHOSEN = torch.tensor([-1.0, -2.0])
POLICY_REJECTED = torch.tensor([-3.0, -1.0])
REF_CHOSEN = torch.tensor([-2.0, -2.0])
REF_REJECTED = torch.tensor([-2.0, -2.0])
BETA = 0.5


def loss(loss_type: str, label_smoothing: float = 0.0):
    return dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA, loss_type, label_smoothing)


def test_sigmoid_loss_by_hand():
    """-log σ(βd) = log(1 + e^{-βd}): log(1 + e^{-1}) = 0.3132617, log(1 + e^{0.5}) = 0.9740770.
    Implicit rewards β(π - ref): chosen 0.5·[1, 0] = [0.5, 0], rejected 0.5·[-1, 1] = [-0.5, 0.5]."""
    losses, chosen_rewards, rejected_rewards = loss("sigmoid")
    torch.testing.assert_close(losses, torch.tensor([0.3132617, 0.9740770]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5, 0.5]))


def test_conservative_sigmoid_loss_by_hand():
    """cDPO, ε = 0.1: -(1-ε) log σ(βd) - ε log σ(-βd).
    βd = 1: 0.9·0.3132617 + 0.1·1.3132617 = 0.2819355 + 0.1313262 = 0.4132617.
    βd = -0.5: 0.9·0.9740770 + 0.1·0.4740770 = 0.8766693 + 0.0474077 = 0.9240770."""
    losses, _, _ = loss("sigmoid", label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.4132617, 0.9240770]))


def test_hinge_loss_by_hand():
    """relu(1 - βd): relu(1 - 1) = 0 and relu(1 + 0.5) = 1.5."""
    losses, _, _ = loss("hinge")
    torch.testing.assert_close(losses, torch.tensor([0.0, 1.5]))


def test_ipo_loss_by_hand():
    """(d - 1/(2β))² with 1/(2β) = 1: (2 - 1)² = 1 and (-1 - 1)² = 4."""
    losses, _, _ = loss("ipo")
    torch.testing.assert_close(losses, torch.tensor([1.0, 4.0]))


def test_robust_loss_by_hand():
    """rDPO, ε = 0.1: [-(1-ε) log σ(βd) + ε log σ(-βd)] / (1 - 2ε).
    βd = 1: log σ(1) = -0.3132617, log σ(-1) = -1.3132617 -> (0.2819355 - 0.1313262) / 0.8 = 0.1882617.
    βd = -0.5: log σ(-0.5) = -0.9740770, log σ(0.5) = -0.4740770 -> (0.8766693 - 0.0474077) / 0.8 = 1.0365770."""
    losses, _, _ = loss("robust", label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.1882617, 1.0365770]))


def test_robust_loss_without_noise_is_the_sigmoid_loss():
    torch.testing.assert_close(loss("robust")[0], loss("sigmoid")[0])


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_sigmoid_loss_is_log_2_when_policy_equals_reference(beta):
    """d = 0, so -log σ(0) = log 2 whatever β and the log-probs; the implicit rewards are 0."""
    chosen, rejected = torch.tensor([-5.0, -0.1, -30.0]), torch.tensor([-1.0, -7.0, -30.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen, rejected, beta)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_gradient_raises_the_chosen_and_lowers_the_rejected_log_prob():
    """d(-log σ(βd))/dπ_c = -β σ(-βd) < 0 and the opposite for π_r: at d = 0 with β = 0.5, ∓0.25."""
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5)
    losses.sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.25]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.25]))


# Reference-free: per-token averaged policy log-probs, chosen -0.5 / rejected -1.0, then the same swapped; β 2, γ 0.5.
AVG_CHOSEN = torch.tensor([-0.5, -1.0])
AVG_REJECTED = torch.tensor([-1.0, -0.5])


def test_simpo_loss_by_hand_ignores_the_reference():
    """-log σ(β(π_c - π_r) - γ): β·(-0.5) - β·(-1.0) - γ = -1 + 2 - 0.5 = 0.5 -> log(1 + e^{-0.5}) = 0.4740770;
    swapped -2 + 1 - 0.5 = -1.5 -> log(1 + e^{1.5}) = 1.7014133. Rewards β·π: chosen [-1, -2], rejected [-2, -1].
    The ref arguments are None (ignored).

    Mutations caught: γ added instead of subtracted (0.2014, 0.9741), γ ignored, γ scaled by β, the reference
    subtracted (None would raise), rewards left unscaled."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        AVG_CHOSEN, AVG_REJECTED, None, None, 2.0, "simpo", simpo_gamma=0.5
    )
    torch.testing.assert_close(losses, torch.tensor([0.4740770, 1.7014133]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-2.0, -1.0]))


def test_orpo_loss_by_hand_is_the_chosen_nll_plus_beta_times_the_odds_ratio_loss():
    """log odds(a) = a - log(1 - e^a): log odds(-0.5) = -0.5 - log(0.3934693) = -0.5 + 0.9327521 = 0.4327521;
    log odds(-1) = -1 - log(0.6321206) = -1 + 0.4586751 = -0.5413249; difference 0.9740770.
    -log σ(0.9740770) = log(1 + e^{-0.9740770}) = log(1.3775407) = 0.3202998, so L = 0.5 + 2·0.3202998 = 1.1405996;
    swapped: -log σ(-0.9740770) = 0.9740770 + 0.3202998 = 1.2943768, L = 1.0 + 2·1.2943768 = 3.5887535.
    Rewards β·π: chosen [-1, -2], rejected [-2, -1].

    Mutations caught: the NLL on the rejected response (L = 1.6406, 3.0888), the odds ratio on log-probs instead of
    log odds (0.5 + 2·0.4741 = 1.4482), β on the NLL instead of the odds term, log(1 - p) written log(1 + p)."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(AVG_CHOSEN, AVG_REJECTED, None, None, 2.0, "orpo")
    torch.testing.assert_close(losses, torch.tensor([1.1405996, 3.5887535]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-2.0, -1.0]))


def test_log_odds_stay_finite_and_exact_near_probability_one():
    """log p = -1e-6: 1 - p = 1e-6 (to 6 digits), so log odds = -1e-6 - log(1e-6) ≈ 13.8155 in float32, where
    log(1 - exp(log p)) rounds 1 - p by 5%. Mutation caught: the naive log1p(-exp) form in float32."""
    odds = log_odds(torch.tensor([-1e-6, -30.0]))
    torch.testing.assert_close(odds, torch.tensor([13.815510, -30.0]), atol=1e-4, rtol=0)


def test_reference_based_losses_refuse_missing_reference_log_probs():
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        dpo_loss(AVG_CHOSEN, AVG_REJECTED, None, None, 2.0, "sigmoid")
