"""PPO's pure functions against hand-computed values: KL estimators, per-token rewards, GAE, clipped policy and
value losses, the adaptive KL controller, the engine's importance weights and the decoupled (asynchronous) loss."""

import math

import pytest
import torch
from torch import Tensor

from lightning_rlhf.losses.off_policy import decoupled_ppo_loss, engine_importance_weights
from lightning_rlhf.losses.policy import adaptive_kl_coef, gae, kl_penalty, ppo_policy_loss, ppo_rewards, ppo_value_loss


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [("k1", math.log(2)), ("k2", 0.5 * math.log(2) ** 2), ("k3", 0.5 - 1 + math.log(2))],
)
def test_kl_estimators_hand_computed(estimator, expected):
    """π(y) = 1/2, π_ref(y) = 1/4: u = ln(1/4) - ln(1/2) = -ln 2, so k1 = ln 2 = 0.6931, k2 = (ln 2)²/2 = 0.2402,
    k3 = e^(-ln 2) - 1 + ln 2 = 0.5 - 1 + 0.6931 = 0.1931."""
    out = kl_penalty(torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]), estimator)
    torch.testing.assert_close(out, torch.tensor([[expected]]))


def test_kl_is_zero_when_policy_equals_reference():
    logprobs = torch.randn(2, 5)
    for estimator in ("k1", "k2", "k3"):
        assert torch.all(kl_penalty(logprobs, logprobs, estimator) == 0)


def test_gae_hand_computed_with_terminal_value_and_ignored_padding():
    """γ = 0.9, λ = 0.5; rewards (1, 0, 2 | 9), values (0.5, 1.0, 1.5 | 7), the last column padding.
    t=2 (last real): δ = 2 + 0.9·0 - 1.5 = 0.5 (terminal: no V_3, and the padding's 7 must not leak); A = 0.5
    t=1: δ = 0 + 0.9·1.5 - 1.0 = 0.35; A = 0.35 + 0.45·0.5 = 0.575
    t=0: δ = 1 + 0.9·1.0 - 0.5 = 1.4;  A = 1.4 + 0.45·0.575 = 1.65875
    returns = A + V = (2.15875, 1.575, 2.0 | 0)."""
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.65875, 0.575, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.15875, 1.575, 2.0, 0.0]]))


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    """λ = γ = 1 telescopes: A_t = Σ_{s≥t} r_s - V_t (Monte Carlo), whatever the values."""
    rewards, values = torch.tensor([[0.1, -0.2, 1.0]]), torch.tensor([[3.0, -1.0, 0.4]])
    advantages, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.9 - 3.0, 0.8 + 1.0, 1.0 - 0.4]]))


def test_ppo_policy_loss_hand_computed():
    """ε = 0.2. Token 1: ρ = 1.5, A = 2: max(-3, -2·1.2 = -2.4) = -2.4 (clipped). Token 2: ρ = 0.5, A = -1:
    max(0.5, 0.8) = 0.8 (clipped). Token 3: ρ = 1, A = 3: -3. Token 4 is masked (ρ = 2, A = 100).
    loss = (-2.4 + 0.8 - 3) / 3 = -1.5333; clipfrac = 2/3; approx_kl = (½ ln²1.5 + ½ ln²0.5 + 0) / 3 = 0.107476."""
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0, 2.0]]))
    advantages = torch.tensor([[2.0, -1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor(-4.6 / 3))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(2 / 3))
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.107476), atol=1e-6, rtol=0)


def test_ppo_value_loss_hand_computed():
    """c = 0.2. V = (2, 0, 1), V_old = (1, 0.5, 1), R = (3, 1, 0).
    t1: clip(V) = 1.2: max((2-3)², (1.2-3)² = 3.24) = 3.24 (clipped); t2: clip(V) = 0.3: max(1, 0.49) = 1;
    t3: 1. loss = ½ · (3.24 + 1 + 1) / 3 = 0.873333; clipfrac = 1/3."""
    values, old, returns = (
        torch.tensor([[2.0, 0.0, 1.0]]),
        torch.tensor([[1.0, 0.5, 1.0]]),
        torch.tensor([[3.0, 1.0, 0.0]]),
    )
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 3), clip_range_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 5.24 / 3))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(1 / 3))


def test_ppo_rewards_put_the_score_on_the_last_real_token_only():
    """β = 0.5; KL (0.2, 0.4, 0.6 | 9) with the last column padding, score 3; second row one token, KL 1, score -1.
    Row 1: -0.5·(0.2, 0.4, 0.6) = (-0.1, -0.2, -0.3), + 3 on the third → (-0.1, -0.2, 2.7, 0) (padding KL 9 ignored).
    Row 2: (-0.5·1 - 1, 0, 0, 0) = (-1.5, 0, 0, 0)."""
    kl = torch.tensor([[0.2, 0.4, 0.6, 9.0], [1.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = ppo_rewards(torch.tensor([3.0, -1.0]), kl, mask, 0.5)
    torch.testing.assert_close(out, torch.tensor([[-0.1, -0.2, 2.7, 0.0], [-1.5, 0.0, 0.0, 0.0]]))


def test_ppo_rewards_of_an_empty_row_are_zero():
    out = ppo_rewards(torch.tensor([4.0]), torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool), 0.1)
    assert torch.all(out == 0)


@pytest.mark.parametrize(("kl", "expected"), [(12.0, 0.105120), (3.0, 0.094880), (6.6, 0.102560)])
def test_adaptive_kl_coef_hand_computed(kl, expected):
    """Target 6, β 0.1, 256 sequences, horizon 1000, so a step moves β by error · 0.256:
    KL 12 → error 12/6 - 1 = 1, clipped to 0.2 → 0.1 · (1 + 0.0512) = 0.10512;
    KL 3 → error -0.5, clipped to -0.2 → 0.1 · (1 - 0.0512) = 0.09488;
    KL 6.6 → error 0.1 (inside the clip) → 0.1 · (1 + 0.0256) = 0.10256."""
    assert adaptive_kl_coef(0.1, kl, 6.0, 256, 1000) == pytest.approx(expected)


def test_engine_importance_weights_truncate_per_token_and_per_sequence():
    """Trainer log-probs ``[[-1.0, -2.0], [-0.5, 9]]``, engine's ``[[-1.5, -1.0], [-0.5, 7]]``, the last token
    padding. δ = trainer - engine = ``[[0.5, -1.0], [0.0, ·]]``.

    token, C = 1.5: ``[[min(e^0.5 = 1.6487, 1.5), e^-1], [e^0, 0]] = [[1.5, 0.36788], [1, 0]]``.
    sequence, C = 1.5: row 0 sums ``0.5 - 1 = -0.5``, ``e^-0.5 = 0.60653`` on both tokens; row 1 ``e^0 = 1``, 0 past
    the mask. sequence, C = 0.5: row 0 ``min(0.60653, 0.5) = 0.5``, row 1 ``min(1, 0.5) = 0.5``.

    Catches: the ratio inverted (engine over trainer: 0.6065 ↔ 1.6487), no cap, the padding counted in the sum
    (row 1 would be e^2, capped), a mean instead of a sum per sequence (e^-0.25), weights left on padding.
    """
    trainer = torch.tensor([[-1.0, -2.0], [-0.5, 9.0]])
    engine = torch.tensor([[-1.5, -1.0], [-0.5, 7.0]])
    mask = torch.tensor([[True, True], [True, False]])
    token = engine_importance_weights(trainer, engine, mask, "token", cap=1.5)
    torch.testing.assert_close(token, torch.tensor([[1.5, 0.36788], [1.0, 0.0]]), atol=1e-5, rtol=0)
    sequence = engine_importance_weights(trainer, engine, mask, "sequence", cap=1.5)
    torch.testing.assert_close(sequence, torch.tensor([[0.60653, 0.60653], [1.0, 0.0]]), atol=1e-5, rtol=0)
    capped = engine_importance_weights(trainer, engine, mask, "sequence", cap=0.5)
    torch.testing.assert_close(capped, torch.tensor([[0.5, 0.5], [0.5, 0.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="engine_is_correction"):
        engine_importance_weights(trainer, engine, mask, "tokens")


def decoupled_case() -> tuple[Tensor, ...]:
    """π_prox = 1 on every token, so ``logprobs = log ρ`` and ``behaviour = -log w_raw``: ρ = π_θ/π_prox = (1.1, 1.5,
    0.9 | 2.0), raw weights π_prox/π_behav = (1.5, 0.5, 3.0 | 5.0), A = (2, 1, -1 | 100), the last token padding."""
    logprobs = torch.log(torch.tensor([[1.1, 1.5, 0.9, 2.0]])).requires_grad_()
    proximal = torch.zeros(1, 4)
    behaviour = -torch.log(torch.tensor([[1.5, 0.5, 3.0, 5.0]]))
    advantages = torch.tensor([[2.0, 1.0, -1.0, 100.0]])
    return logprobs, proximal, behaviour, advantages, torch.tensor([[True, True, True, False]])


def test_decoupled_ppo_loss_clips_against_the_proximal_policy_and_weights_by_the_truncated_behaviour_ratio():
    """ε = 0.2, C = 2 (``decoupled_case``); loss_t = w_t · max(-A ρ, -A clip(ρ, 0.8, 1.2)):
    t1: w = 1.5 (under C), ρ = 1.1 inside the clip: 1.5 · -2.2 = -3.3;
    t2: w = 0.5, ρ = 1.5, A > 0, clipped: 0.5 · max(-1.5, -1.2) = -0.6;
    t3: w = min(3, 2) = 2, ρ = 0.9 inside: 2 · 0.9 = 1.8;  t4 padding.
    loss = (-3.3 - 0.6 + 1.8) / 3 = -0.7; clipfrac 1/3 (t2); approx_kl = ½(ln²1.1 + ln²1.5 + ln²0.9) / 3 = 0.0307645;
    is_weight_mean = (1.5 + 0.5 + 2) / 3 = 4/3; is_clipped = 1/3 (t3).
    ∂loss/∂logprobs = -A·w·ρ / 3 where unclipped, 0 where clipped: (-2·1.5·1.1, 0, 1·2·0.9, 0) / 3 = (-1.1, 0, 0.6, 0).

    Catches: clipping against the behaviour ratio with no weight (ρ_behav = ρ·w_raw = (1.65, 0.75, 2.7): (-2.4 - 0.75
    + 2.7) / 3 = -0.15), the weight inverted (π_behav/π_prox: (-1.4667 - 2.4 + 0.3) / 3 = -1.189), the cap not
    applied (t3 2.7: -0.4), the mask ignored (/4: -0.525; the padding's w·A = 2·100 would swamp it), the weight left
    out of the gradient (∂ at t1 -0.7333), the clip range not applied (t2 -0.75: -0.75)."""
    logprobs, proximal, behaviour, advantages, mask = decoupled_case()
    loss, stats = decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, clip_range=0.2, cap=2.0)
    torch.testing.assert_close(loss, torch.tensor(-0.7))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(1 / 3))
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.0307645), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["is_weight_mean"], torch.tensor(4 / 3))
    torch.testing.assert_close(stats["is_clipped"], torch.tensor(1 / 3))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.1, 0.0, 0.6, 0.0]]))


def test_decoupled_ppo_loss_sends_no_gradient_through_the_importance_weight():
    """The weight π_prox/π_behav is data: with the proximal and behaviour log-probs requiring gradient, none reaches
    the behaviour's (it appears only in the weight), and the proximal's is the ratio's alone: ρ = exp(log π_θ -
    log π_prox), so ∂loss_t/∂log π_prox = +A·w·ρ / 3 where unclipped: (3.3, 0, -1.8, 0) / 3 = (1.1, 0, -0.6, 0).

    Catches: the weight differentiated (the behaviour gets a gradient; through w = exp(log π_prox - log π_behav) the
    proximal's would cancel to 0 on t1 and t3)."""
    logprobs, proximal, behaviour, advantages, mask = decoupled_case()
    proximal.requires_grad_(), behaviour.requires_grad_()
    loss, _ = decoupled_ppo_loss(logprobs, proximal, behaviour, advantages, mask, clip_range=0.2, cap=2.0)
    loss.backward()
    assert behaviour.grad is None
    torch.testing.assert_close(proximal.grad, torch.tensor([[1.1, 0.0, -0.6, 0.0]]))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_decoupled_ppo_loss_with_behaviour_equal_to_proximal_is_ppo_policy_loss_exactly(aggregation, level):
    """π_behav == π_prox: every weight is e^0 = 1 (C = 2 >= 1), so the loss, its statistics and its gradient are
    ``ppo_policy_loss``'s, bit for bit, whatever the aggregation. Catches: any drift of the composed path (a weight
    not exactly 1, the ratio taken against anything but π_prox, the padding's advantages leaking)."""
    generator = torch.Generator().manual_seed(0)
    proximal, advantages = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logprobs = (proximal + 0.3 * torch.randn(3, 5, generator=generator)).requires_grad_()
    loss, stats = decoupled_ppo_loss(
        logprobs, proximal, proximal.clone(), advantages, mask, 0.2, 2.0, level, aggregation, max_length=5
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected, expected_stats = ppo_policy_loss(logprobs, proximal, advantages, mask, 0.2, aggregation, max_length=5)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)
    assert all(torch.equal(stats[name], value) for name, value in expected_stats.items())
    assert stats["is_weight_mean"] == 1 and stats["is_clipped"] == 0
