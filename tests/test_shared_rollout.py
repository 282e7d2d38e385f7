"""The shared-prompt layout for rollouts: the G responses of a prompt (consecutive rollout rows) forwarded with the
prompt once give the log-probs, values and rewards of the padded rows."""

import pytest
import torch

from lightning_rlhf import PromptDataModule
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.tokens import token_logprobs
from lightning_rlhf.models.causal_lm import forward_logits, load_causal_lm, next_tokens
from lightning_rlhf.models.reward import load_reward_model, reward_head, sequence_rewards, token_values
from lightning_rlhf.rl.generation import mask_after_eos
from lightning_rlhf.rl.layouts import (
    SharedRollouts,
    rollout_shared_batch,
    shared_rollout_logprobs,
    shared_rollout_rewards,
    shared_rollout_values,
)
from tests.helpers import make_tiny_export, make_tiny_gpt2_export
from tests.test_ppo import fit, make_exports, ppo


def visible(mask):
    return [[torch.nonzero(query).flatten().tolist() for query in row[0]] for row in mask]


def test_rollout_rows_with_one_prompt_share_a_row_hand_worked():
    """Prompts of 3 columns, left-padded; responses of 3 columns, padded after EOS (2); pad 0.
    Rows 0 and 1 have the prompt [5, 6] (row 0 answers 7 8 2, row 1 answers 9 2), row 2 the prompt [4, 5, 6] (answers
    3). Shared rows: 5 6 7 8 2 9 2 (positions 0 1 2 3 4 2 3; 9 sees 5 6 and itself, not 7 8 2) and 4 5 6 3 + 3 pads,
    t = 7. Column index (the column predicting each response token, flat into 2 · 7): row 0: 1 2 3; row 1: 1 5, then
    5 again past its end; row 2: 7 + 2 = 9 three times. Rewards at 2 (column 4), 2 (column 6), 3 (7 + 3 = 10).
    Catches a run split or merged wrongly, a response predicted from its sibling, positions not restarted."""
    sequences = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 5, 6, 9, 2, 0], [4, 5, 6, 3, 0, 0]])
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    shared = rollout_shared_batch(sequences, attention, start=3, pad_token_id=0)
    assert shared["input_ids"].tolist() == [[5, 6, 7, 8, 2, 9, 2], [4, 5, 6, 3, 0, 0, 0]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 3, 0, 1, 2]]
    assert visible(shared["attention_mask"])[0] == [
        [0],
        [0, 1],
        [0, 1, 2],
        [0, 1, 2, 3],
        [0, 1, 2, 3, 4],
        [0, 1, 5],
        [0, 1, 5, 6],
    ]
    assert shared["column_index"].tolist() == [[1, 2, 3], [1, 5, 5], [9, 9, 9]]
    assert shared["reward_index"].tolist() == [4, 6, 10]


ARCHITECTURES = {"llama": make_tiny_export, "gpt2": make_tiny_gpt2_export}


def rollout(tokenizer, groups=3, group_size=4, width=6, seed=0):
    """Left-padded prompts of 2-5 tokens, each with ``group_size`` random responses of ``width`` columns cut at a
    random EOS (some never stop), as ``generation.generate`` returns them."""
    generator = torch.Generator().manual_seed(seed)
    prompt_width = 5
    rows, masks = [], []
    for g in range(groups):
        n = 2 + g
        prompt = torch.randint(3, 200, (n,), generator=generator).tolist()
        for _ in range(group_size):
            response = torch.randint(3, 200, (width,), generator=generator)
            stop = int(torch.randint(0, width + 2, (1,), generator=generator))  # past the width: never stops
            if stop < width:
                response[stop] = tokenizer.eos_token_id
            keep = mask_after_eos(response[None], tokenizer.eos_token_id)[0]
            response = response.masked_fill(~keep, tokenizer.pad_token_id)
            rows.append([tokenizer.pad_token_id] * (prompt_width - n) + prompt + response.tolist())
            masks.append([0] * (prompt_width - n) + [1] * n + keep.long().tolist())
    return torch.tensor(rows), torch.tensor(masks), prompt_width


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_rollout_logprobs_values_and_rewards_equal_the_padded_rows(tmp_path, architecture, attn):
    """Policy log-probs at temperature 0.7 (with their gradients), values and rewards of 3 prompts × 4 responses:
    shared = padded to 1e-5 on every response token (and reward). Catches a column read off by one, a response read
    from its sibling's columns, the temperature dropped."""
    path = ARCHITECTURES[architecture](tmp_path / "model")
    tokenizer = load_tokenizer(path)
    policy = load_causal_lm(path, tokenizer).eval()
    reward_model = load_reward_model(path, tokenizer).eval()
    for model in (policy, reward_model):
        model.set_attn_implementation(attn)
    with torch.no_grad():
        reward_head(reward_model).weight *= 100  # a fresh head's rewards are about 1e-2: 1e-5 is then a tighter bound
    sequences, attention, start = rollout(tokenizer)
    mask = attention[:, start:].bool()
    shared = rollout_shared_batch(sequences, attention, start, tokenizer.pad_token_id)
    assert len(shared["input_ids"]) == 3

    logits = forward_logits(policy, sequences, attention, logits_to_keep=sequences.size(1) - start + 1)
    padded = token_logprobs(logits, next_tokens(sequences[:, start - 1 :]), temperature=0.7)[:, :-1]
    together = shared_rollout_logprobs(policy, shared, sequences[:, start:], temperature=0.7)
    torch.testing.assert_close(together[mask], padded[mask], atol=1e-5, rtol=0)
    padded[mask].sum().backward()
    padded_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    together[mask].sum().backward()
    for got, expected in zip([p.grad for p in policy.parameters()], padded_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        values = token_values(reward_model, sequences, attention)[:, start - 1 : -1]
        shared_values = shared_rollout_values(reward_model, reward_head(reward_model), shared)
        torch.testing.assert_close(shared_values[mask], values[mask], atol=1e-5, rtol=0)
        rewards = sequence_rewards(reward_model, sequences, attention)
        torch.testing.assert_close(shared_rollout_rewards(reward_model, shared), rewards, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def ppo_exports(tmp_path_factory) -> tuple[str, str]:
    return make_exports(tmp_path_factory.mktemp("shared_rollout"))


@pytest.mark.parametrize(
    "options",
    [{"advantage_estimator": "grpo", "num_generations": 4}, {}, {"value_head": True}],
    ids=["grpo", "gae_value_model", "gae_value_head"],
)
def test_ppo_training_logs_the_same_with_shared_prompts(ppo_exports, tmp_path, options):
    """Two optimiser steps (one rollout of 4 prompts, 2 minibatches) of GRPO (G = 4: a prompt's responses share a
    row) and of PPO with a value model or a value head (G = 1: a row per response): every logged training metric
    (scores, KL, entropy, policy and value losses, clip fractions, gradient norms) as in the padded layout, to 1e-5.
    Catches the layout not used where a forward needs it (values, rewards, update minibatches) or used wrongly."""

    def run(shared: bool) -> dict[str, float]:
        module = ppo(ppo_exports, max_new_tokens=6, ppo_epochs=1, num_mini_batches=2, shared_prompt=shared, **options)
        data = PromptDataModule(tokenizer_name_or_path=ppo_exports[0], batch_size=4, max_length=32, val_fraction=0.0)
        trainer = fit(module, data, 2, tmp_path / str(shared))
        assert isinstance(module.rollout_layout, SharedRollouts) == shared
        return {name: float(value) for name, value in trainer.logged_metrics.items() if name.startswith("train/")}

    padded, shared = run(False), run(True)
    assert padded.keys() == shared.keys() and "train/loss/policy" in padded
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)
