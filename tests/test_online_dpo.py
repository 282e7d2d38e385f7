"""Online DPO as the RL module's ``dpo`` objective: pairs from each group's best and worst response, the DPO loss of
the policy's sequence log-probs against the reference's, no value function, and it learns what the reward rewards."""

import math

import lightning as L
import pytest
import torch

from lightning_rlhf import PPOModule, PromptDataModule
from lightning_rlhf.losses import best_worst_pairs
from lightning_rlhf.rl.experience import Experience
from lightning_rlhf.rl.generation import Rollout
from lightning_rlhf.rl.updates import PPOUpdates
from tests.test_critic_free import fit_rl_config
from tests.test_ppo import fit, make_exports, mean_score, ppo


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[str, str]:
    return make_exports(tmp_path_factory.mktemp("online_dpo"))


def test_best_worst_pairs_hand_computed():
    """G = 4, three groups:
    - (0.1, 0.9, 0.5, 0.9): best 0.9, first at index 1 -> row 1; worst 0.1 at index 0 -> row 0;
    - (0.3, 0.3, 0.3, 0.3): all equal, no pair;
    - (1, 0, 0, 2): best at index 3 -> row 8 + 3 = 11; worst 0, first at index 1 -> row 9.
    Catches: indices within the group instead of rows (3 and 1 for the last pair), a tie made into a pair (three
    pairs), chosen and rejected swapped, the last equal best taken (row 3)."""
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 0.0, 2.0])
    chosen, rejected, paired = best_worst_pairs(scores, 4)
    assert chosen.tolist() == [1, 11] and rejected.tolist() == [0, 9]
    assert paired.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="group_size=1"):
        best_worst_pairs(scores, 1)


def updates(**kwargs) -> PPOUpdates:
    settings = dict(
        clip_range=0.2,
        clip_range_value=0.2,
        vf_coef=0.1,
        kl_loss_coef=0.0,
        ptx_coef=0.0,
        loss_aggregation="token_mean",
        max_new_tokens=2,
        num_generations=2,
        num_mini_batches=1,
        objective="dpo",
        dpo_beta=1.0,
    )
    return PPOUpdates(**{**settings, **kwargs})


def two_group_experience() -> tuple[Experience, torch.Tensor]:
    """Two groups of G = 2 with 2 response tokens: group 0 scored (1, 0), group 1 (0.5, 0.5) (no pair). Row 1's
    second token is padding, with log-probs that would change the sums if counted."""
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    rollout = Rollout(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long), mask, 1)
    ref = torch.tensor([[-1.5, -1.5], [-1.0, -2.0], [-1.0, -1.0], [-1.0, -1.0]])
    logprobs = torch.tensor([[-1.0, -1.0], [-0.5, -7.0], [-2.0, -2.0], [-0.1, -0.1]])
    zeros = torch.zeros(4, 2)
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
    experience = Experience(rollout, logprobs, None, zeros, None, scores, zeros.sum(-1), torch.ones(4).bool(), ref)
    return experience, logprobs


def test_dpo_objective_hand_computed():
    """Group 0 is the only pair: chosen row 0, rejected row 1 (group 1 scored alike: no pair, half the prompts).
    Sequence log-probs over real tokens only: policy row 0 = −2, row 1 = −0.5 (its padded −7 not counted); reference
    row 0 = −3, row 1 = −1. Log-ratios: chosen −2 − (−3) = 1, rejected −0.5 − (−1) = 0.5; β = 1:
    loss = −log σ(1 − 0.5) = log(1 + e^−0.5) = 0.474077; implicit rewards 1 and 0.5, margin 0.5, accuracy 1; the
    scores' margin 1 − 0 = 1.
    Catches: padding counted (rejected ratio −4.5, loss ≈ 0.0041), chosen and rejected swapped (0.974077), the tie
    made a pair, the reference left out (d = −1.5: 1.701413), per-token averaging for sigmoid."""
    experience, logprobs = two_group_experience()
    loss, stats = updates().loss(experience, torch.arange(4), logprobs, None)
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(-0.5))))
    expected = {
        "dpo/rewards/chosen": 1.0,
        "dpo/rewards/rejected": 0.5,
        "dpo/rewards/margins": 0.5,
        "dpo/rewards/accuracies": 1.0,
        "dpo/score_margin": 1.0,
        "dpo/no_pair": 0.5,
    }
    for name, value in expected.items():
        torch.testing.assert_close(stats[name], torch.tensor(value), msg=name)


def test_dpo_objective_ipo_averages_per_token_and_beta_scales():
    """IPO on per-token averages: chosen (−1 − (−1.5)) = 0.5, rejected (−0.5 − (−1)) / 1 = 0.5, d = 0; with β = 0.5:
    (0 − 1/(2·0.5))² = 1. Sigmoid with β = 2 on the summed d = 0.5: log(1 + e^−1) = 0.313262.
    Catches: IPO on sums (d = 0.5: 0.25), β ignored (0.474077)."""
    experience, logprobs = two_group_experience()
    ipo, _ = updates(dpo_loss_type="ipo", dpo_beta=0.5).loss(experience, torch.arange(4), logprobs, None)
    torch.testing.assert_close(ipo, torch.tensor(1.0))
    sigmoid, _ = updates(dpo_beta=2.0).loss(experience, torch.arange(4), logprobs, None)
    torch.testing.assert_close(sigmoid, torch.tensor(math.log1p(math.exp(-1.0))))


def test_dpo_objective_adds_rpo_nll_of_the_chosen_response_per_token():
    """dpo_nll_weight 0.5: the chosen row 0 has log-probs −1, −1, so a per-token NLL of 1; loss = 0.474077 + 0.5 · 1
    = 0.974077, dpo/nll 1. Catches: the NLL of the rejected row (0.5 → 0.724077), summed rather than averaged over
    tokens (2 → 1.474077), the weight ignored (0.474077)."""
    experience, logprobs = two_group_experience()
    loss, stats = updates(dpo_nll_weight=0.5).loss(experience, torch.arange(4), logprobs, None)
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(-0.5)) + 0.5))
    torch.testing.assert_close(stats["dpo/nll"], torch.tensor(1.0))


def test_a_minibatch_without_a_pair_gives_zero_loss_with_a_graph():
    """Only group 1 (rows 2, 3, scored alike): no pair, loss 0 that backward can still run through."""
    experience, logprobs = two_group_experience()
    logprobs = logprobs[2:].clone().requires_grad_()
    loss, stats = updates().loss(experience, torch.tensor([2, 3]), logprobs, None)
    loss.backward()
    assert loss.item() == 0 and stats["dpo/no_pair"].item() == 1 and "dpo/rewards/margins" not in stats
    assert logprobs.grad is not None and not logprobs.grad.any()


def test_dpo_objective_builds_no_value_function_and_refuses_what_it_cannot_use(exports):
    module = ppo(exports, objective="dpo", num_generations=2, max_new_tokens=4)
    assert module.value_model is None and module.value_head is None and module.ref_model is not None
    with pytest.raises(ValueError, match="num_generations=1"):
        PPOModule(*exports, objective="dpo")
    with pytest.raises(ValueError, match="advantage_estimator='grpo'"):
        PPOModule(*exports, objective="dpo", num_generations=2, advantage_estimator="grpo")
    with pytest.raises(ValueError, match="objective='kto'"):
        PPOModule(*exports, objective="kto")
    with pytest.raises(ValueError, match="dpo_beta=0"):
        PPOModule(*exports, objective="dpo", num_generations=2, dpo_beta=0)
    with pytest.raises(ValueError, match="dpo_nll_weight=1.0: RPO's term belongs to objective='dpo'"):
        PPOModule(*exports, dpo_nll_weight=1.0)
    with pytest.raises(ValueError, match="dpo_nll_weight=-1.0: must be >= 0"):
        PPOModule(*exports, objective="dpo", num_generations=2, dpo_nll_weight=-1.0)


def test_online_dpo_with_a_reward_function_learns_what_it_rewards(exports, tmp_path):
    """Online DPO against the share of "a" in the response, 4 responses per prompt: the mean score of sampled
    responses on held-out prompts rises."""
    data = PromptDataModule(tokenizer_name_or_path=exports[0], batch_size=8, max_length=32, val_fraction=0.1)
    data.setup("fit")
    held_out = next(iter(data.val_dataloader()))
    L.seed_everything(0)
    module = ppo(
        (exports[0],), reward_fn="tests.test_ppo.share_of_a", objective="dpo", num_generations=4, max_new_tokens=8
    )
    before = mean_score(module, held_out)
    fit(module, data, 120, tmp_path)
    after = mean_score(module, held_out)
    assert after > before + 0.3, (before, after)  # measured: 0.013 -> 1.0 (0.02 after 40 steps, 0.78 after 80)


def test_dpo_online_config_runs_through_the_cli_and_logs_pairs_and_validation(exports, tmp_path):
    scalars = fit_rl_config("dpo_online.yaml", exports, tmp_path)
    for name in ("loss/policy", "dpo/rewards/margins", "dpo/rewards/accuracies", "dpo/score_margin", "dpo/no_pair"):
        assert f"train/{name}" in scalars, scalars
    assert "val/objective/scores" in scalars and "train/loss/value" not in scalars
