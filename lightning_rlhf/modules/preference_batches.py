"""What ``DPOModule`` works out from a comparison batch on the CPU: a digest of each response (the key of its cached
reference log-prob) and how the batch's pairs weigh."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor


def row_keys(batch: dict[str, Any]) -> list[bytes]:
    """A digest of each response's real tokens and labels: the same response after the same prompt, wherever it is;
    a shared-prompt batch carries the same digests (``data.shared_prompt.sequence_key``)."""
    if "sequence_keys" in batch:
        return [key.tobytes() for key in batch["sequence_keys"].cpu().numpy()]
    input_ids, labels, mask = (batch[k].cpu() for k in ("input_ids", "labels", "attention_mask"))
    return [
        hashlib.blake2b(torch.stack([ids[m], lab[m]]).numpy().tobytes(), digest_size=16).digest()
        for ids, lab, m in zip(input_ids, labels, mask.bool(), strict=True)
    ]


def pair_layout(batch: dict[str, Tensor]) -> dict[str, Any]:
    """How a comparison batch's pairs weigh, worked out on the CPU before the batch moves to the device (on a GPU,
    ``nonzero``, ``bincount``, ``unique`` and ``int()`` would each wait for the device).

    Returns:
        ``pair_weights``: ``(p,)`` ``1 / (pairs of the pair's prompt · prompts with pairs in the batch)``, so each
            prompt with pairs weighs the same and its pairs share its weight;
        ``best``: ``(m,)`` rows better in some pair and worse in none (RPO's NLL term);
        ``n_prompts``: the number of prompts with pairs, an ``int``.
    """
    rows, present = batch["response_index"], batch["response_index"] >= 0  # (b, k) flat row of each response
    prompt_of_row = torch.zeros(int(present.sum()), dtype=torch.long)  # (n,)
    prompt_of_row[rows[present]] = torch.arange(len(rows))[:, None].expand_as(rows)[present]
    chosen, rejected = batch["pairs"].unbind(-1)  # (p,)
    pairs_per_prompt = torch.bincount(prompt_of_row[chosen], minlength=len(rows))  # (b,)
    n_prompts = int((pairs_per_prompt > 0).sum())
    weights = 1.0 / (pairs_per_prompt[prompt_of_row[chosen]] * max(n_prompts, 1)).float()
    best = torch.unique(chosen[~torch.isin(chosen, rejected)])
    return {"pair_weights": weights, "best": best, "n_prompts": n_prompts}
