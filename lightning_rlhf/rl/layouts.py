"""The shared-prompt layout for rollouts: the RL module's forwards over several responses to one prompt.

A rollout's rows are left-padded prompt ⊕ response (``generation.Rollout``); GRPO / RLOO put the G responses of a
prompt in consecutive rows. Consecutive rows with the same prompt become one row of the shared-prompt layout
(``data.shared_prompt``): the prompt once, then each response, each seeing the prompt and itself only, positions
continuing from the prompt's end. Outputs come back in the rollout's ``(b, r)`` response columns, so the log-probs,
values and rewards are those of the padded rows (to rounding) and nothing downstream changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_rlhf.data.shared_prompt import shared_attention_mask, shared_prompt_group
from lightning_rlhf.losses.tokens import token_logprobs
from lightning_rlhf.models.causal_lm import forward_logits, next_tokens
from lightning_rlhf.models.lora import unwrap
from lightning_rlhf.models.reward import TOKEN_KEY, reward_head, sequence_rewards, token_values
from lightning_rlhf.models.shared_forward import check_shared_prompt_attention, shared_rewards, token_outputs


def rollout_shared_batch(sequences: Tensor, attention_mask: Tensor, start: int, pad_token_id: int) -> dict[str, Tensor]:
    """Rollout rows ``(b, p + r)`` (left-padded prompts of ``p = start`` columns, responses after) in the shared-prompt
    layout, one row per run of consecutive rows with the same prompt.

    Returns ``input_ids``, ``position_ids``, ``attention_mask`` (4D) of the ``g`` shared rows, and, as flat indices into
    their ``g · t`` columns:
        ``column_index``: ``(b, r)`` the column whose output stands at rollout column ``start - 1 + j``, the one that
            predicts response token ``j`` (past a response's end: its last predicting column, to be masked);
        ``reward_index``: ``(b,)`` each response's last real token (where a reward is read).
    """
    rows = list(zip(sequences.tolist(), attention_mask.tolist(), strict=True))
    prompts = [[token for token, real in zip(ids[:start], mask[:start], strict=True) if real] for ids, mask in rows]
    responses = [ids[start : start + sum(mask[start:])] for ids, mask in rows]
    runs: list[list[int]] = []  # rows of each run of one prompt
    for i, prompt in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == prompt:
            runs[-1].append(i)
        else:
            runs.append([i])
    groups = [shared_prompt_group(prompts[run[0]], [responses[i] for i in run]) for run in runs]
    t = max(len(group.input_ids) for group in groups)
    width = sequences.size(1) - start
    column_index, reward_index = [[0] * width for _ in prompts], [0] * len(prompts)
    for g, (run, group) in enumerate(zip(runs, groups, strict=True)):
        first = 0  # index of the response's first token in the group's ``sources``
        for k, i in enumerate(run):
            n = len(responses[i])
            sources = group.sources[first : first + n]
            column_index[i] = [g * t + sources[min(j, n - 1)] for j in range(width)]
            reward_index[i] = g * t + group.last[k]
            first += n
    pad = [t - len(group.input_ids) for group in groups]
    device = sequences.device
    tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    segment = tensor([[g] * len(group.input_ids) + [-1] * pad[g] for g, group in enumerate(groups)])
    return {
        "input_ids": tensor([group.input_ids + [pad_token_id] * pad[g] for g, group in enumerate(groups)]),
        "position_ids": tensor([group.position_ids + list(range(pad[g])) for g, group in enumerate(groups)]),
        "attention_mask": shared_attention_mask(
            segment, tensor([group.branch + [0] * pad[g] for g, group in enumerate(groups)])
        ),
        "column_index": tensor(column_index),
        "reward_index": tensor(reward_index),
    }


def shared_rollout_logprobs(
    model: PreTrainedModel, shared: dict[str, Tensor], responses: Tensor, temperature: float = 1.0
) -> Tensor:
    """``(b, r)`` log-probs of the rollout's response tokens under ``model`` at ``temperature``, from one forward of
    the shared rows (``rollout_shared_batch``); what ``forward_logits`` over the padded rows gives (past a response's
    end: a value to be masked)."""
    logits = token_outputs(model, shared).flatten(0, 1)[shared["column_index"]]  # (b, r, v)
    return token_logprobs(logits, responses, temperature=temperature)


def shared_rollout_hidden(model: PreTrainedModel, shared: dict[str, Tensor]) -> Tensor:
    """``(b, r, h)`` the backbone's last hidden states at the columns that predict each response token."""
    return token_outputs(model, shared, hidden=True).flatten(0, 1)[shared["column_index"]]


def shared_rollout_values(model: PreTrainedModel, head: nn.Linear, shared: dict[str, Tensor]) -> Tensor:
    """``(b, r)`` float32 values of the states before each response token (``reward.token_values`` of the
    padded rows at columns ``start - 1 : -1``)."""
    return head(shared_rollout_hidden(model, shared)).squeeze(-1).float()


def shared_rollout_rewards(model: PreTrainedModel, shared: dict[str, Tensor]) -> Tensor:
    """``(b,)`` float32 rewards, offset subtracted (``reward.sequence_rewards`` of the padded rows)."""
    return shared_rewards(model, shared, subtract_offset=True)


class SharedRollouts:
    """The RL module's seam to the layout: shared rows built once per rollout tensor (the policy, reference, value
    and reward forwards of one chunk, or an update minibatch, reuse them) and each model checked at its first use."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.last: tuple[Tensor, int, dict[str, Tensor]] | None = None
        self.checked: set[int] = set()

    def rows(self, sequences: Tensor, attention_mask: Tensor, start: int) -> dict[str, Tensor]:
        if self.last is None or self.last[0] is not sequences or self.last[1] != start:
            self.last = (sequences, start, rollout_shared_batch(sequences, attention_mask, start, self.pad_token_id))
        return self.last[2]

    def check(self, model: PreTrainedModel, device: torch.device, hidden: bool = False) -> None:
        if id(model) not in self.checked:
            check_shared_prompt_attention(model, device, hidden)
            self.checked.add(id(model))

    def logprobs(
        self, model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, start: int, temperature: float
    ) -> Tensor:
        """``(b, r)`` as ``PPOModule.response_logprobs``."""
        self.check(model, sequences.device)
        shared = self.rows(sequences, attention_mask, start)
        return shared_rollout_logprobs(model, shared, sequences[:, start:], temperature)

    def columns(self, states: Tensor, sequences: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """``(b, r, ·)`` of per-column ``states`` ``(g, t, ·)`` of the shared rows, at the columns before each token."""
        return states.flatten(0, 1)[self.rows(sequences, attention_mask, start)["column_index"]]

    def values(self, model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """``(b, r)`` as ``reward.token_values(...)[:, start - 1 : -1]``."""
        self.check(model, sequences.device, hidden=True)
        shared = self.rows(sequences, attention_mask, start)
        return shared_rollout_values(model, reward_head(unwrap(model)), shared)

    def rewards(self, model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """``(b,)`` as ``reward.sequence_rewards``; padded rows for a model that reads an appended token."""
        if getattr(unwrap(model).config, TOKEN_KEY, None) is not None:
            return sequence_rewards(model, sequences, attention_mask)
        self.check(model, sequences.device, hidden=True)
        return shared_rollout_rewards(model, self.rows(sequences, attention_mask, start))


class PaddedRollouts:
    """The same seam over the rollout's own left-padded rows, one per response (``shared_prompt=False``)."""

    def logprobs(
        self, model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, start: int, temperature: float
    ) -> Tensor:
        """``(b, r)`` log-prob of each response token (columns ``start:``) under ``model``'s tempered distribution;
        logits for the columns ``start - 1:`` only (``logits_to_keep``), never over the prompt."""
        logits = forward_logits(model, sequences, attention_mask, logits_to_keep=sequences.size(1) - start + 1)
        targets = next_tokens(sequences[:, start - 1 :])  # (b, r + 1): column t-1 predicts token t; last: none
        return token_logprobs(logits, targets, temperature=temperature)[:, :-1]

    def columns(self, states: Tensor, sequences: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """``(b, r, ·)`` of per-column ``states`` ``(b, t, ·)``, at the columns before each response token."""
        return states[:, start - 1 : -1]

    def values(self, model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """``(b, r)`` value of the state before each response token."""
        return token_values(model, sequences, attention_mask)[:, start - 1 : -1]

    def rewards(self, model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """``(b,)`` float32 rewards, offset subtracted."""
        return sequence_rewards(model, sequences, attention_mask)
