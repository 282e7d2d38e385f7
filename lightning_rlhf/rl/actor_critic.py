"""The models of a PPO run and the policy's forward with its values.

The policy and the frozen reference start from the SFT export; the reward model scores whole sequences; the value
function is its own network initialised from the reward model (its backbone and head, read at every position), or a
linear head on the policy's last hidden state (``value_head``); the critic-free estimators build none. Dropout is off
in policy and value model, so repeated forwards agree and the first minibatch's probability ratio is exactly 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.causal_lm import disable_dropout, load_causal_lm
from lightning_rlhf.models.lora import apply_lora, unwrap
from lightning_rlhf.models.reward import load_reward_model, reward_head
from lightning_rlhf.rl.layouts import PaddedRollouts, SharedRollouts
from lightning_rlhf.training.strategies import enable_activation_checkpointing


class PPOModels(NamedTuple):
    """The five places a PPO run's weights live; ``None`` where the options build nothing."""

    policy: PreTrainedModel
    value_model: PreTrainedModel | None
    value_head: nn.Linear | None
    ref_model: PreTrainedModel | None
    reward_model: PreTrainedModel | None


MODEL_ROLES = ("policy", "value model", "value head", "reference", "reward model")  # PPOModels' order


@dataclass(frozen=True)
class ModelOptions:
    """Which models a PPO run loads, and how: PPOModule's arguments of the same names."""

    model_name_or_path: str
    ref_model_name_or_path: str | None = None
    reward_model_name_or_path: str | None = None
    dtype: str = "float32"
    advantage_estimator: str = "gae"  # ``gae`` needs a value function, the critic-free estimators build none
    objective: str = "clipped"  # ``dpo`` (pairs, not advantages) builds none either
    value_head: bool = False
    lora: dict | None = None
    gradient_checkpointing: bool = False

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> ModelOptions:
        """The options among ``arguments`` (PPOModule's hparams), by name."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls)})


def load_ppo_models(tokenizer: PreTrainedTokenizerBase, options: ModelOptions, meta: bool = False) -> PPOModels:
    """Load the policy (LoRA adapters on it with ``lora``), the reference (none with ``lora`` and no other reference:
    the policy with its adapter off), the reward model, and with ``gae`` (``clipped`` objective) a value model or
    ``value_head``. The frozen ones in eval mode without gradients; ``meta``: parameters on the meta device
    (``strategies.Rank0Load``)."""
    sft, rewards, dtype, lora = (
        options.model_name_or_path,
        options.reward_model_name_or_path,
        options.dtype,
        options.lora,
    )
    critic = options.advantage_estimator == "gae" and options.objective == "clipped"
    policy = load_causal_lm(sft, tokenizer, dtype, meta=meta)
    reference = options.ref_model_name_or_path or sft
    check_same_vocabulary(tokenizer, reference, sft, "reference model")
    if lora is not None:
        policy = apply_lora(policy, lora)
    ref_model = reward_model = value_model = head = None
    if lora is None or reference != sft:
        ref_model = load_causal_lm(reference, tokenizer, dtype, meta=meta).eval().requires_grad_(False)
    if rewards is not None:
        check_same_vocabulary(tokenizer, rewards, sft, "reward model")
        reward_model = load_reward_model(rewards, tokenizer, dtype, meta=meta).eval().requires_grad_(False)
    if critic and options.value_head:
        head = value_head_from(policy, reward_head(reward_model) if reward_model else None)
    elif critic:  # from an SFT export with a fresh head when there is no reward model
        value_model = load_reward_model(rewards or sft, tokenizer, dtype, meta=meta)
        if lora is not None:
            value_model = apply_lora(value_model, lora, task_type="SEQ_CLS")
    for trained in (policy, value_model):
        if trained is not None:
            disable_dropout(trained)
            if options.gradient_checkpointing:
                enable_activation_checkpointing(trained)
    return PPOModels(policy, value_model, head, ref_model, reward_model)


def check_same_vocabulary(tokenizer: PreTrainedTokenizerBase, path: str, policy_path: str, role: str) -> None:
    """The model at ``path`` must read every policy token id as the policy does: the same vocabulary, or a superset
    of it (a reward model trained with ``reward_token`` has that one token more)."""
    if path == policy_path:
        return
    theirs = load_tokenizer(path).get_vocab()
    if any(theirs.get(token) != index for token, index in tokenizer.get_vocab().items()):
        raise ValueError(
            f"the {role} {path} and the policy {policy_path} use different tokenizers: "
            "token ids only mean the same to both when its vocabulary holds the policy's, id for id (train it "
            "from the same SFT export)"
        )


def value_head_from(policy: PreTrainedModel, reward_head: nn.Linear | None) -> nn.Linear:
    """A value head on the policy's hidden states: the reward model's head when there is one of the same width,
    else zeros, with a bias (from 0) for the mean return."""
    width = policy.config.hidden_size
    head = nn.Linear(width, 1, dtype=policy.dtype, device=policy.device)  # meta under Rank0Load
    with torch.no_grad():
        head.bias.zero_()
        head.weight.zero_()
        if reward_head is not None and reward_head.weight.shape == head.weight.shape:
            head.weight.copy_(reward_head.weight)
        elif reward_head is not None:
            rank_zero_info(
                f"value head: the reward model is {reward_head.in_features} wide, the policy {width}; "
                "starting from zeros"
            )
    return head


def policy_outputs(
    models: PPOModels,
    layout: PaddedRollouts | SharedRollouts,
    temperature: float,
    sequences: Tensor,
    attention_mask: Tensor,
    start: int,
) -> tuple[Tensor, Tensor | None]:
    """``(b, r)`` policy log-probs of the response tokens (columns ``start:``, under ``softmax(logits / temperature)``)
    and float32 values of the states before them (the value at the column before each token, like the logits that
    predict it); values ``None`` without a value function. A value head reads the policy's own forward: the
    backbone's output is caught on its way to the LM head (``output_hidden_states`` comes back empty when FSDP2 has
    swapped the layers' classes)."""
    policy, head = models.policy, models.value_head
    if head is None:
        logprobs = layout.logprobs(policy, sequences, attention_mask, start, temperature)
        if models.value_model is None:
            return logprobs, None
        return logprobs, layout.values(models.value_model, sequences, attention_mask, start)
    caught: list[Tensor] = []
    hook = unwrap(policy).base_model.register_forward_hook(lambda module, args, out: caught.append(out[0]))
    try:
        logprobs = layout.logprobs(policy, sequences, attention_mask, start, temperature)
    finally:
        hook.remove()
    states = layout.columns(caught[-1], sequences, attention_mask, start)
    return logprobs, head(states).squeeze(-1).float()
