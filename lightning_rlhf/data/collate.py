"""Tokenized examples -> padded batches.

Demonstrations and comparisons are right-padded (training forwards take padding-independent positions from
the attention mask); prompts that will be generated from are left-padded so every row ends at the same column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_rlhf.losses import IGNORE_INDEX


def pad(sequences: Sequence[Sequence[int]], value: int, left: bool = False) -> Tensor:
    """``(n, longest)`` long tensor of the sequences, padded with ``value`` on the right (or left)."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        columns = slice(longest - len(seq), longest) if left else slice(0, len(seq))
        out[row, columns] = torch.as_tensor(seq, dtype=torch.long)
    return out


def _attention_mask(sequences: Sequence[Sequence[int]], left: bool = False) -> Tensor:
    return pad([[1] * len(s) for s in sequences], 0, left=left)


class DemonstrationCollator:
    """``input_ids``, ``attention_mask``, ``labels`` (prompt and padding = ``IGNORE_INDEX``), all ``(b, t)``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        input_ids = [ex["input_ids"] for ex in examples]
        return {
            "input_ids": pad(input_ids, self.pad_token_id),
            "attention_mask": _attention_mask(input_ids),
            "labels": pad([ex["labels"] for ex in examples], IGNORE_INDEX),
        }


class ComparisonCollator:
    """Whole prompts with all their responses; each response appears once.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: ``(n, t)`` over the ``n`` responses of the batch, each
            prompt ⊕ response (labels mask the prompt);
        ``ranks``: ``(b, k_max)``, -1 where a prompt has fewer than ``k_max`` responses;
        ``response_index``: ``(b, k_max)`` row of each response in the flat tensors, -1 where absent;
        ``pairs``: ``(p, 2)`` flat rows ``(better, worse)`` of every ordered pair (ties give none).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        k_max = max(len(ex["ranks"]) for ex in examples)
        ranks = torch.full((len(examples), k_max), -1, dtype=torch.long)
        response_index = torch.full((len(examples), k_max), -1, dtype=torch.long)
        sequences, labels, pairs = [], [], []
        for b, ex in enumerate(examples):
            prompt = ex["prompt_ids"]
            first = len(sequences)
            for k, (response, rank) in enumerate(zip(ex["response_ids"], ex["ranks"], strict=True)):
                ranks[b, k], response_index[b, k] = rank, len(sequences)
                sequences.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
            pairs += [
                (first + i, first + j)
                for i, rank_i in enumerate(ex["ranks"])
                for j, rank_j in enumerate(ex["ranks"])
                if rank_i < rank_j
            ]
        return {
            "input_ids": pad(sequences, self.pad_token_id),
            "attention_mask": _attention_mask(sequences),
            "labels": pad(labels, IGNORE_INDEX),
            "ranks": ranks,
            "response_index": response_index,
            "pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2),
        }


class PromptCollator:
    """Left-padded ``input_ids`` and ``attention_mask``, ``(b, t)``, ready for ``generate``.

    Examples that carry pretraining text under ``"ptx"`` (PPO-ptx) add it right-padded as ``ptx_input_ids``,
    ``ptx_attention_mask`` and ``ptx_labels``, ``(b, s)``, as ``DemonstrationCollator`` would.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.texts = DemonstrationCollator(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        input_ids = [ex["input_ids"] for ex in examples]
        batch = {
            "input_ids": pad(input_ids, self.pad_token_id, left=True),
            "attention_mask": _attention_mask(input_ids, left=True),
        }
        if "ptx" in examples[0]:
            texts = self.texts([ex["ptx"] for ex in examples])
            batch.update({f"ptx_{name}": value for name, value in texts.items()})
        return batch
