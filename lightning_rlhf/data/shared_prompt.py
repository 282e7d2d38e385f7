"""The shared-prompt layout: each prompt once, then each of its responses, in padding-free rows.

A comparison's prompt ``x`` and its K responses ``y_1 … y_K`` go in one stretch of a row: ``x y_1 y_2 … y_K``
instead of K padded rows ``x y_k``. An explicit attention mask lets each response token see the prompt and the
earlier tokens of its own response, never a sibling's, and each response's positions continue from the prompt's
end as if it were alone, so every token sees exactly the context and positions it has in the padded layout: its
hidden states, log-probs and reward are the same (to rounding). Several prompts' stretches share a row of at most
``row_length`` tokens (``collate.pack_rows``), with the same examples per batch as the padded layout, so losses,
metrics and a resumed run's data are unchanged.

With tokens counted by ``T = len(x) + Σ len(y_k)`` instead of ``K · len(x) + Σ len(y_k)``, a prompt of 19 tokens
and 8 responses of 7 (the toy task) is 75 tokens instead of 208.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from lightning_rlhf.data.collate import comparison_rankings, pack_rows
from lightning_rlhf.losses.tokens import IGNORE_INDEX


class SharedGroup(NamedTuple):
    """One prompt and its responses laid out as ``prompt ⊕ y_1 ⊕ … ⊕ y_K``; every list is relative to its start.

    ``branch``: 0 on the prompt, ``k + 1`` on response ``k``; ``last``: the column of each response's last token
    (its end-of-turn token, where the reward is read); ``sources``, ``targets``: for each response token in order,
    the column whose logits predict it (the token before it in its own sequence: the prompt's last token for a
    response's first) and the token itself; ``owners``: which response (0 … K-1) each of those tokens belongs to.
    """

    input_ids: list[int]
    position_ids: list[int]
    branch: list[int]
    last: list[int]
    sources: list[int]
    targets: list[int]
    owners: list[int]


def shared_prompt_group(prompt: list[int], responses: list[list[int]]) -> SharedGroup:
    """Lay out ``prompt`` once and each of ``responses`` after it (see ``SharedGroup``)."""
    if not prompt or not all(responses):
        raise ValueError("the shared-prompt layout needs a prompt token and at least one token in each response")
    input_ids, positions, branch = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    last, sources, targets, owners = [], [], [], []
    for k, response in enumerate(responses):
        start = len(input_ids)
        input_ids += response
        positions += range(len(prompt), len(prompt) + len(response))  # as if this response alone followed the prompt
        branch += [k + 1] * len(response)
        sources += [len(prompt) - 1, *range(start, start + len(response) - 1)]
        targets += response
        owners += [k] * len(response)
        last.append(start + len(response) - 1)
    return SharedGroup(input_ids, positions, branch, last, sources, targets, owners)


def shared_attention_mask(segment: Tensor, branch: Tensor) -> Tensor:
    """``(r, 1, t, t)`` boolean mask, True where query token ``i`` may attend to key token ``j`` of its row.

    Args:
        segment: ``(r, t)`` which prompt group each token belongs to; padding has a segment of its own (-1).
        branch: ``(r, t)`` 0 on a prompt (and padding), ``k + 1`` on the group's response ``k``.

    ``i`` sees ``j`` when ``j ≤ i`` (causal), both are in the same group, and ``j`` is on the prompt or on ``i``'s own
    branch. A padding token sees only earlier padding and itself (never nothing: a row of an sdpa mask with no True
    gives NaN), and no real token sees padding.
    """
    t = segment.size(-1)
    causal = torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()
    same_group = segment[:, :, None] == segment[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (causal & same_group & visible)[:, None]


def sequence_key(input_ids: list[int], labels: list[int]) -> bytes:
    """A digest of one prompt ⊕ response sequence (its token ids and labels): the same bytes as
    ``modules.preference_batches.row_keys`` gives its padded row, so cached reference log-probs serve either layout."""
    return hashlib.blake2b(np.array([input_ids, labels], dtype=np.int64).tobytes(), digest_size=16).digest()


def _concatenated(groups: list[SharedGroup], field: str, shifts: Sequence[int]) -> Tensor:
    """``field`` of every group, each plus its shift, end to end: ``(Σ len,)`` long."""
    parts = [np.add(getattr(group, field), shift, dtype=np.int64) for group, shift in zip(groups, shifts, strict=True)]
    return torch.from_numpy(np.concatenate(parts))


class SharedPromptCollator:
    """Comparison batches in the shared-prompt layout, several prompts per row of at most ``row_length`` tokens (a
    prompt group longer than that has a row of its own).

    Returns, over ``r`` rows of ``t`` columns and the batch's ``n`` responses (in ``ComparisonCollator``'s order):
        ``input_ids``, ``position_ids``: ``(r, t)``; padding at a row's end has positions 0, 1, …;
        ``attention_mask``: ``(r, 1, t, t)`` boolean (``shared_attention_mask``): to be given to the model as is;
        ``reward_index``: ``(n,)`` flat index (into ``r · t``) of each response's last token;
        ``logprob_index``, ``logprob_targets``, ``logprob_owner``: ``(m,)`` over the ``m`` response tokens: the flat
            index of the column whose logits predict the token, the token, and its response (0 … n-1);
        ``ranks``, ``response_index``, ``pairs``: as ``ComparisonCollator``'s;
        ``sequence_keys``: ``(n, 16)`` uint8, the digest (``sequence_key``) of each prompt ⊕ response, for cached
            reference log-probs. A tensor, not a list of ``bytes``: Lightning's batch transfer walks a ``bytes`` object
            byte by byte, which cost the reward model 12 ms of its 69 ms step.
    """

    def __init__(self, pad_token_id: int, row_length: int):
        self.pad_token_id, self.row_length = pad_token_id, row_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # Built in numpy and converted once: torch.tensor over nested lists was a third of the collation's time.
        groups = [shared_prompt_group(ex["prompt_ids"], ex["response_ids"]) for ex in examples]
        lengths = [len(group.input_ids) for group in groups]
        rows = pack_rows(lengths, max(self.row_length, *lengths))
        t = max(sum(lengths[g] for g in row) for row in rows)
        input_ids = np.full((len(rows), t), self.pad_token_id, dtype=np.int64)
        positions = np.zeros((len(rows), t), dtype=np.int64)
        segment = np.full((len(rows), t), -1, dtype=np.int64)
        branch = np.zeros((len(rows), t), dtype=np.int64)
        offset = [0] * len(groups)  # flat index (into r · t) of each group's first token
        for r, row in enumerate(rows):
            column = 0
            for g in row:
                end = column + lengths[g]
                input_ids[r, column:end] = groups[g].input_ids
                positions[r, column:end] = groups[g].position_ids
                segment[r, column:end] = g
                branch[r, column:end] = groups[g].branch
                offset[g], column = r * t + column, end
            positions[r, column:] = np.arange(t - column)
        keys = b"".join(
            sequence_key(ex["prompt_ids"] + y, [IGNORE_INDEX] * len(ex["prompt_ids"]) + y)
            for ex in examples
            for y in ex["response_ids"]
        )
        first = np.cumsum([0] + [len(group.last) for group in groups[:-1]])  # number of each group's first response
        return {
            "input_ids": torch.from_numpy(input_ids),
            "position_ids": torch.from_numpy(positions),
            "attention_mask": shared_attention_mask(torch.from_numpy(segment), torch.from_numpy(branch)),
            "reward_index": _concatenated(groups, "last", offset),
            "logprob_index": _concatenated(groups, "sources", offset),
            "logprob_targets": _concatenated(groups, "targets", [0] * len(groups)),
            "logprob_owner": _concatenated(groups, "owners", first),
            **comparison_rankings(examples),
            "sequence_keys": torch.from_numpy(np.frombuffer(keys, dtype=np.uint8).reshape(-1, 16).copy()),
        }
