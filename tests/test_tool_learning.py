"""GRPO learns to call the toy task's tool (``lightning_rlhf.toy.ToolEnv``), through ``PPOModule``'s episodes.

A tiny untrained model never writes a well-formed tool call by chance, and an SFT model good enough to would cost
minutes of CI. So the policy's sampling is narrowed to two first turns, drawn with the policy's own probability of
each: the ``add`` call (its result then answered, reward 1) or the answer ``0`` at once (reward 0). Everything else is
the real loop: the environment's observations, the episode's mask, GRPO's group advantages, the clipped update.
"""

from __future__ import annotations

import re

import lightning as L
import torch

from lightning_rlhf import PPOModule, PromptDataModule
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.rl.generation import Rollout, mask_after_eos
from lightning_rlhf.toy.tools import operands, tool_call_text
from tests.helpers import TINY_CONFIG
from tests.test_ppo import fit

RESULT = re.compile(r"<\|tool\|>(\d+)\n<\|assistant\|>$")


def first_turns(context: str, eos: str) -> list[str]:
    """The two first turns of a question's episode: the tool's call, or the wrong answer ``0``."""
    a, b = operands(context.split("<|user|>")[-1].split("\n")[0])
    return [tool_call_text(a, b) + "\n" + eos, "0\n" + eos]


def mean_logprob(model, context_ids: torch.Tensor, turn_ids: torch.Tensor) -> torch.Tensor:
    """The policy's mean per-token log-prob of ``turn_ids`` after ``context_ids`` (1-D, unpadded)."""
    ids = torch.cat([context_ids, turn_ids])[None]
    logits = model(input_ids=ids).logits[0, context_ids.numel() - 1 : -1]
    return logits.log_softmax(-1).gather(-1, turn_ids[:, None]).mean()


def tool_probability(model, tokenizer, context_ids: torch.Tensor) -> torch.Tensor:
    """P(the tool's call) among the two first turns: a softmax of their mean per-token log-probs (the call is ~75
    tokens, the answer 3; summed log-probs would make an untrained model's choice certain)."""
    context = tokenizer.decode(context_ids)
    scores = [
        mean_logprob(model, context_ids, torch.tensor(tokenizer.encode(t, add_special_tokens=False)))
        for t in first_turns(context, tokenizer.eos_token)
    ]
    return torch.stack(scores).softmax(0)[0]


class TwoTurnEngine:
    """An engine (``rl.engines``) whose first turn is sampled between the two of ``first_turns`` with the policy's
    ``tool_probability``, and whose turn after the tool's result answers that result."""

    def sync(self, model) -> None:
        pass

    @torch.no_grad()
    def generate(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, temperature, **_) -> Rollout:
        turns = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            context_ids = ids[mask.bool()]
            result = RESULT.search(tokenizer.decode(context_ids))
            if result:
                turns.append(result.group(1) + "\n" + tokenizer.eos_token)
            else:
                call = torch.rand(()) < tool_probability(model, tokenizer, context_ids)
                turns.append(first_turns(tokenizer.decode(context_ids), tokenizer.eos_token)[0 if call else 1])
        encoded = [tokenizer.encode(t, add_special_tokens=False)[:max_new_tokens] for t in turns]
        width = max(map(len, encoded))
        responses = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded])
        response_mask = mask_after_eos(responses, tokenizer.eos_token_id)
        sequences = torch.cat([input_ids, responses], 1)
        return Rollout(
            sequences, torch.cat([attention_mask, response_mask.long()], 1), response_mask, input_ids.size(1)
        )


def expected_reward(module: PPOModule, batch: dict) -> float:
    """The mean episode reward the policy would earn on ``batch``'s prompts: its ``tool_probability`` (the call is
    always answered rightly, ``0`` never is)."""
    tokenizer = module.tokenizer
    with torch.no_grad():
        return (
            torch.stack(
                [
                    tool_probability(module.model, tokenizer, ids[mask.bool()])
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
                ]
            )
            .mean()
            .item()
        )


def test_grpo_on_tool_episodes_learns_to_call_the_tool(tmp_path):
    """4 episodes a prompt, rewarded 1 when the tool was called (its sum then answered) and 0 for the answer ``0``:
    the policy's probability of calling the tool on held-out prompts, which is its expected episode reward, rises
    from about one half. Catches: the advantage's sign flipped, the episode's reward not reaching the policy's
    tokens, the update not applied (all of which leave it flat or falling)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)  # the tiny config's 128 positions are too few for a prompt, a call and the answer
    policy = load_causal_lm(None, tokenizer, "float32", {**TINY_CONFIG, "max_position_embeddings": 256})
    model = str(export_pretrained(policy, tokenizer, tmp_path / "model"))
    data = PromptDataModule(
        train_path="toy:tool_prompts", tokenizer_name_or_path=model, batch_size=4, max_length=48, val_fraction=0.02
    )
    data.setup("fit")
    held_out = next(iter(data.val_dataloader()))
    L.seed_everything(0)
    module = PPOModule(
        model,
        environment="lightning_rlhf.toy.ToolEnv",
        max_turns=2,
        max_new_tokens=96,
        max_episode_tokens=160,
        advantage_estimator="grpo",
        num_generations=4,
        kl_in_reward=False,
        kl_loss_coef=0.0,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    module.configure_model()
    module.engine = TwoTurnEngine()
    before = expected_reward(module, held_out)
    fit(module, data, 12, tmp_path)
    after = expected_reward(module, held_out)
    assert after > before + 0.3, (before, after)  # measured: 0.50 -> 0.84 (advantages negated: 0.17)
