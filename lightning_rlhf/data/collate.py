"""Tokenized examples -> padded batches.

Demonstrations and comparisons are right-padded (training forwards take padding-independent positions from
the attention mask); prompts that will be generated from are left-padded so every row ends at the same column.
With packing, demonstrations are instead concatenated into rows with ``position_ids`` restarting at each sequence
(``PackedDemonstrationCollator``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_rlhf.losses.tokens import IGNORE_INDEX


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


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Indices of the sequences grouped into rows of at most ``row_length`` tokens: first fit, longest first (a
    sequence goes into the first row it fits in, else opens a new one). Each row lists its indices in order.

    A sequence longer than ``row_length`` is an error: it could only be cut, and the tokenizer already bounds it.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > row_length:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a packed row of {row_length}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(row_length)
        rows[row].append(i)
        room[row] -= lengths[i]
    return [sorted(row) for row in rows]


class PackedDemonstrationCollator:
    """Padding-free demonstration batches: the batch's sequences concatenated into as few rows of at most
    ``row_length`` tokens as ``pack_rows`` finds, so the model computes on (almost) no padding.

    Returns ``(r, t)`` tensors, ``r`` rows no more than the examples:
        ``input_ids``; ``position_ids``, restarting at 0 at each sequence (and at the padding that ends a short
        row), from which transformers keeps attention inside each sequence (see ``causal_lm.packed_logits``);
        ``labels`` as ``DemonstrationCollator``'s, plus ``IGNORE_INDEX`` at each sequence's first token, so no
        sequence is predicted from the one before it in its row; ``attention_mask``: 1 on real tokens, for
        counting them only (the model is given no mask: a mask would turn off the per-sequence attention).

    The examples of a batch are those of the unpacked batch, so the loss (a mean over the same scored tokens), the
    optimisation and a resumed run's data are as without packing.
    """

    def __init__(self, pad_token_id: int, row_length: int):
        self.pad_token_id, self.row_length = pad_token_id, row_length

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        rows = pack_rows([len(ex["input_ids"]) for ex in examples], self.row_length)
        input_ids, positions, labels = [], [], []
        for row in rows:
            input_ids.append([token for i in row for token in examples[i]["input_ids"]])
            positions.append([t for i in row for t in range(len(examples[i]["input_ids"]))])
            labels.append([label for i in row for label in [IGNORE_INDEX, *examples[i]["labels"][1:]]])
        longest = max(len(ids) for ids in input_ids)
        return {
            "input_ids": pad(input_ids, self.pad_token_id),
            "position_ids": pad([p + list(range(longest - len(p))) for p in positions], 0),
            "labels": pad(labels, IGNORE_INDEX),
            "attention_mask": _attention_mask(input_ids),
        }


def comparison_rankings(examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """The ranks of a batch of comparisons and where their responses are, responses numbered in order (example by
    example, response by response) over the batch's ``n`` responses.

    Returns:
        ``ranks``: ``(b, k_max)``, -1 where a prompt has fewer than ``k_max`` responses;
        ``response_index``: ``(b, k_max)`` number of each response, -1 where absent;
        ``pairs``: ``(p, 2)`` numbers ``(better, worse)`` of every ordered pair (ties give none).
    """
    k_max = max(len(ex["ranks"]) for ex in examples)
    ranks = np.full((len(examples), k_max), -1, dtype=np.int64)
    response_index = np.full((len(examples), k_max), -1, dtype=np.int64)
    pairs, first = [np.zeros((0, 2), dtype=np.int64)], 0
    for b, ex in enumerate(examples):
        k, rank = len(ex["ranks"]), np.asarray(ex["ranks"], dtype=np.int64)
        ranks[b, :k] = rank
        response_index[b, :k] = np.arange(first, first + k)
        pairs.append(np.argwhere(rank[:, None] < rank[None, :]) + first)  # (i, j) in row-major order
        first += k
    pairs_tensor = torch.from_numpy(np.concatenate(pairs))
    ranks, response_index = torch.from_numpy(ranks), torch.from_numpy(response_index)
    return {"ranks": ranks, "response_index": response_index, "pairs": pairs_tensor}


class ComparisonCollator:
    """Whole prompts with all their responses; each response appears once.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: ``(n, t)`` over the ``n`` responses of the batch, each
            prompt ⊕ response (labels mask the prompt);
        ``ranks``, ``response_index`` (the row of each response in the flat tensors), ``pairs``: see
            ``comparison_rankings``.

    ``shared_prompt.SharedPromptCollator`` lays the same batch out with each prompt once.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        sequences, labels = [], []
        for ex in examples:
            prompt = ex["prompt_ids"]
            for response in ex["response_ids"]:
                sequences.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
        return {
            "input_ids": pad(sequences, self.pad_token_id),
            "attention_mask": _attention_mask(sequences),
            "labels": pad(labels, IGNORE_INDEX),
            **comparison_rankings(examples),
        }


class PromptCollator:
    """Left-padded ``input_ids`` and ``attention_mask``, ``(b, t)``, ready for ``generate``, and ``records``: each
    prompt's record (its fields, for an environment's ``reset``).

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
        if "fields" in examples[0]:  # each prompt's record, for an environment's reset
            batch["records"] = [json.loads(ex["fields"]) for ex in examples]
        if "ptx" in examples[0]:
            texts = self.texts([ex["ptx"] for ex in examples])
            batch.update({f"ptx_{name}": value for name, value in texts.items()})
        return batch


class UnpairedCollator:
    """KTO batches: each record's prompt with its labelled completions and, apart, for KTO's reference point, the
    prompt once more with a completion of another prompt: the first completion of the batch's next record (the last
    record's prompt takes the first record's), its end cut to fit ``max_length``. Ethayarajh et al. (2024) estimate
    ``KL(π ‖ π_ref)`` from such mismatched pairs. A batch of one record pairs its prompt with its own completion.

    Returns the batch ``comparisons`` (a ``ComparisonCollator`` or ``SharedPromptCollator``) makes of the labelled
    completions (all tied, so no pairs), plus ``desirable``: ``(n,)`` long, 1 for a desirable completion, 0 for an
    undesirable one; and ``mismatched``: the batch ``comparisons`` makes of the mismatched rows, one per record. Two
    batches, not one, so the module can forward the mismatched rows without autograd: no gradient flows from the
    reference point, and their activations need not be kept for the backward pass.
    """

    def __init__(self, comparisons: Any, max_length: int):
        self.comparisons, self.max_length = comparisons, max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        labelled, mismatched, desirable = [], [], []
        for i, ex in enumerate(examples):
            prompt, completions = list(ex["prompt_ids"]), list(ex["response_ids"])
            other = list(examples[(i + 1) % len(examples)]["response_ids"][0])[: self.max_length - len(prompt)]
            labelled.append({"prompt_ids": prompt, "response_ids": completions, "ranks": [0] * len(completions)})
            mismatched.append({"prompt_ids": prompt, "response_ids": [other], "ranks": [0]})
            desirable += ex["desirable"]
        return {
            **self.comparisons(labelled),
            "desirable": torch.tensor(desirable, dtype=torch.long),
            "mismatched": self.comparisons(mismatched),
        }
