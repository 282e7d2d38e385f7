"""The rollout-engine seam without vLLM (``lightning_rlhf.rl.engines``): the weights a vLLM engine is loaded with (LoRA
merged, names of the export), the guard around engine calls, option checks, and the engine correction of today's
(synchronous) path as the decoupled PPO loss. The engine itself: test_vllm.py."""

import copy
import random

import numpy as np
import pytest
import torch

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses import decoupled_ppo_loss
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.lora import apply_lora
from lightning_rlhf.rl.engines import build_engine, check_engine_options, named_weights, process_state_kept
from lightning_rlhf.rl.experience import Experience, correct_for_engine
from lightning_rlhf.rl.generation import Rollout
from lightning_rlhf.rl.updates import PPOUpdates


def test_named_weights_of_a_lora_policy_are_its_merged_weights_under_the_exports_names(tiny_model_dir):
    """A LoRA policy (adapters with B ≠ 0 on every linear layer, ``lm_head`` trained in full as a module to save):
    the weights handed to the engine are exactly ``merge_and_unload()``'s, name for name as the plain model's state
    dict, and the policy itself is left unmerged. Catches: the base weights without ``scale · B A``, the frozen
    ``lm_head`` instead of its trained copy, peft's names (``base_layer``, ``lora_A``) reaching the engine, merging
    into the policy in place (its adapter-off reference would drift)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    policy = apply_lora(load_causal_lm(tiny_model_dir, tokenizer), {"r": 4, "modules_to_save": ["lm_head"]})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    before = {name: param.clone() for name, param in policy.named_parameters()}
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    weights = dict(named_weights(policy))
    assert weights.keys() == expected.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=name)
    assert all(torch.equal(param, before[name]) for name, param in policy.named_parameters())
    assert not torch.equal(weights["lm_head.weight"], load_causal_lm(tiny_model_dir, tokenizer).lm_head.weight)


def test_named_weights_of_a_plain_model_are_its_parameters_by_name(tiny_model_dir):
    """Without LoRA: every parameter once, under its own name, the tensor itself (no copy)."""
    model = load_causal_lm(tiny_model_dir, load_tokenizer(tiny_model_dir))
    weights, params = list(named_weights(model)), list(model.named_parameters())
    assert [name for name, _ in weights] == [name for name, _ in params]
    assert all(weight.data_ptr() == param.data_ptr() for (_, weight), (_, param) in zip(weights, params, strict=True))


def process_state() -> tuple:
    """The next draws of Python's, NumPy's and torch's global generators, and the thread settings."""
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    return draws, torch.get_num_threads(), torch.set_num_threads


def test_process_state_kept_restores_what_an_in_process_engine_changes():
    """Inside: every generator reseeded, another thread count, ``torch.set_num_threads`` replaced by a no-op (what
    vLLM's CPU worker does). After: the next draws, the thread count and the function are the caller's. Catches any
    one of the five restorations left out."""
    threads = torch.get_num_threads()
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    expected = process_state()
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    with process_state_kept():
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        torch.set_num_threads(threads + 1)
        torch.set_num_threads = lambda n: None
    assert process_state() == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("paged", "none", 2.0), r"rollout_engine='paged' is not one of \['hf', 'vllm'\]"),
        (("vllm", "tokens", 2.0), r"engine_is_correction='tokens' is not one of \['none', 'token', 'sequence'\]"),
        (("hf", "token", 2.0), "engine_is_correction corrects for a rollout engine other than the policy"),
        (("vllm", "sequence", 0.0), r"engine_is_cap=0.0: must be > 0"),
    ],
)
def test_bad_engine_options_are_refused_with_what_to_do(args, message):
    with pytest.raises(ValueError, match=message):
        check_engine_options(*args)


def test_the_hf_engine_takes_no_engine_options():
    with pytest.raises(ValueError, match="engine_options \\['sleep'\\] are for rollout_engine='vllm'"):
        build_engine("hf", "unused", "float32", {"sleep": True})


def engine_sampled_experience() -> tuple[Experience, torch.Tensor]:
    """Experience of three responses of 3 tokens (one padded) with random engine log-probs (``rollout.logprobs``),
    trainer log-probs, advantages, and the policy's log-probs to update with, all ``(3, 3)``."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    engine, trainer, policy, advantages = (torch.randn(3, 3, generator=generator) * 0.5 for _ in range(4))
    rollout = Rollout(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), mask, 1, engine)
    zeros = torch.zeros(3)
    return Experience(rollout, trainer, None, advantages, None, zeros, zeros, zeros.bool()), policy


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_the_sync_engine_correction_is_the_decoupled_loss_with_the_trainers_rollout_logprobs_as_proximal(level):
    """A rollout holds the engine's log-probs of what it sampled (the behaviour policy); its experience the trainer's,
    recomputed before the updates (the proximal policy); the update's ratio is taken against the latter. So
    ``correct_for_engine``'s weighted advantages through ``PPOUpdates.clipped_objective`` are exactly
    ``decoupled_ppo_loss(π_θ, π_prox = experience.logprobs, π_behav = rollout.logprobs)``, and an asynchronous worker
    that records its engine's log-probs gets the decoupled objective from the same path. Random log-probs of three
    responses (one padded), C = 1.2 so some weights are truncated at either level.

    Catches: ``correct_for_engine`` weighting by engine over trainer, the update's ratio taken against the engine's
    log-probs, the cap or the level not passed through."""
    experience, policy = engine_sampled_experience()
    engine, trainer, advantages, mask = (
        experience.rollout.logprobs,
        experience.logprobs,
        experience.advantages,
        experience.rollout.response_mask,
    )
    updates = PPOUpdates(0.2, 0.2, 0.1, 0.0, 0.0, "token_mean", 3, 1, 1)
    loss, _ = updates.clipped_objective(correct_for_engine(experience, level, 1.2), torch.arange(3), policy, None)
    expected, stats = decoupled_ppo_loss(policy, trainer, engine, advantages, mask, 0.2, 1.2, level)
    torch.testing.assert_close(loss, expected, atol=1e-7, rtol=0)
    assert 0 < stats["is_clipped"] < 1  # the cap is exercised
    plain, _ = updates.clipped_objective(correct_for_engine(experience, "none", 1.2), torch.arange(3), policy, None)
    assert not torch.allclose(plain, expected)
