"""losses.ranking_loss against hand-computed values: K-way rankings with ties and absent responses."""

import math

import torch
import torch.nn.functional as F

from lightning_rlhf.losses.preference import ranking_loss


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_ranking_loss_k3_with_a_tie_and_an_absent_response_matches_hand_computation():
    """Prompt A: K = 3, rewards (2, 0, 1), ranks (0, 1, 1): responses 1 and 2 tie, so the ordered pairs are
    (0 > 1) and (0 > 2):  L_A = ½ [-log σ(2 - 0) - log σ(2 - 1)] = ½ (0.126928 + 0.313262) = 0.220095.
    Prompt B: two responses and an absent third slot (rank -1, reward 100 that must not count), rewards
    (0.5, 1.5), ranks (1, 0): one pair (1 > 0):  L_B = -log σ(1.5 - 0.5) = 0.313262.
    Loss = mean over prompts = (0.220095 + 0.313262) / 2 = 0.266679.
    Counting the tie as a pair would add -log σ(±1) to A; counting the absent slot would add log σ(±99.5) to B."""
    rewards = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, 100.0]])
    ranks = torch.tensor([[0, 1, 1], [1, 0, -1]])
    expected = ((neg_log_sigmoid(2.0) + neg_log_sigmoid(1.0)) / 2 + neg_log_sigmoid(1.0)) / 2
    assert abs(expected - 0.266679) < 1e-6
    torch.testing.assert_close(ranking_loss(rewards, ranks), torch.tensor(expected), rtol=0, atol=1e-6)


def test_ranking_loss_k3_fully_ranked_averages_all_three_pairs_once():
    """Rewards (0, 1, 3), ranks (2, 1, 0): pairs 2>1, 2>0, 1>0, loss = ⅓ [-log σ(2) - log σ(3) - log σ(1)]."""
    loss = ranking_loss(torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[2, 1, 0]]))
    expected = (neg_log_sigmoid(2.0) + neg_log_sigmoid(3.0) + neg_log_sigmoid(1.0)) / 3
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=0, atol=1e-6)


def test_ranking_loss_with_k2_is_the_pairwise_loss():
    """Either order of the two slots gives -log σ(r_chosen - r_rejected), averaged over prompts."""
    torch.manual_seed(0)
    chosen, rejected = torch.randn(6), torch.randn(6)
    expected = -F.logsigmoid(chosen - rejected).mean()
    rewards = torch.stack([chosen, rejected], dim=1)
    torch.testing.assert_close(ranking_loss(rewards, torch.tensor([[0, 1]] * 6)), expected)
    torch.testing.assert_close(ranking_loss(rewards.flip(1), torch.tensor([[1, 0]] * 6)), expected)


def test_ranking_loss_is_invariant_to_adding_a_constant_to_all_rewards():
    torch.manual_seed(0)
    rewards = torch.randn(5, 4)
    ranks = torch.tensor([[0, 1, 2, 3], [1, 0, 1, -1], [2, 2, 0, 1], [0, 1, -1, -1], [3, 0, 1, 2]])
    loss = ranking_loss(rewards, ranks)
    assert loss > 0
    torch.testing.assert_close(ranking_loss(rewards + 3.7, ranks), loss)
    torch.testing.assert_close(ranking_loss(rewards - 50.0, ranks), loss)


def test_ranking_loss_leaves_prompts_without_pairs_out_of_the_mean():
    """A prompt whose responses all tie has no pair: the loss is that of the other prompt alone."""
    rewards = torch.tensor([[1.0, 0.0], [5.0, -5.0]])
    loss = ranking_loss(rewards, torch.tensor([[0, 1], [0, 0]]))
    torch.testing.assert_close(loss, torch.tensor(neg_log_sigmoid(1.0)), rtol=0, atol=1e-6)


def test_ranking_loss_margin_and_centering_terms():
    """margin m: -log σ(r_w - r_l - m); center_coef c adds c · mean of r² over present responses.
    Rewards (1, 0, absent 7), ranks (0, 1, -1), m = 0.5, c = 0.1: -log σ(0.5) + 0.1 · (1 + 0) / 2."""
    rewards, ranks = torch.tensor([[1.0, 0.0, 7.0]]), torch.tensor([[0, 1, -1]])
    loss = ranking_loss(rewards, ranks, margin=0.5, center_coef=0.1)
    torch.testing.assert_close(loss, torch.tensor(neg_log_sigmoid(0.5) + 0.05), rtol=0, atol=1e-6)


def test_ranking_loss_gradient_reaches_each_present_response_once():
    """d/dr of ½[-log σ(r0 - r1) - log σ(r0 - r2)] at r = 0: r0 gets -½, r1 and r2 get +¼; the absent slot 0."""
    rewards = torch.zeros(1, 4, requires_grad=True)
    ranking_loss(rewards, torch.tensor([[0, 1, 1, -1]])).backward()
    torch.testing.assert_close(rewards.grad, torch.tensor([[-0.5, 0.25, 0.25, 0.0]]))
