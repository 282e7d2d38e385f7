"""What the ``rm`` and ``dpo`` benchmarks share: the preference pairs as a DataModule, the work credited per pair,
and ``--shared-prompt``'s run of ours padded or in the shared-prompt layout on K-way comparisons."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from .common import Row, fit_lightning, model_flops, result
from .data import kway_comparisons, preference_pairs


def pair_work(args: argparse.Namespace, model, stage: str) -> tuple[int, float]:
    """Real tokens and model FLOPs of prompt ⊕ chosen and prompt ⊕ rejected in the timed steps, from the pairs'
    means: both sides are credited the same work per pair, whatever order their loaders draw the pairs in."""
    from lightning_rlhf.data.records import Record
    from lightning_rlhf.data.tokenization import Tokenizer
    from lightning_rlhf.data.tokenizer import load_tokenizer

    pairs = preference_pairs(args)
    records = [
        Record(str(i), {"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]], "ranks": [0, 1]})
        for i, p in enumerate(pairs)
    ]
    examples = Tokenizer(load_tokenizer(args.model_dir), args.max_length).comparisons(records)
    lengths = [[len(ex["prompt_ids"]) + len(r) for r in ex["response_ids"]] for ex in examples]
    trained = args.batch_size * args.steps / len(examples)  # pairs trained on, per pair of the data
    tokens = sum(map(sum, lengths)) * trained
    flops = sum(model_flops(model, pair, stage) for pair in lengths) * trained
    return int(tokens), flops


def pairs_datamodule(args: argparse.Namespace, model_dir: str, unpaired: bool = False):
    """The preference pairs as comparisons, or (``unpaired``, for KTO) as their chosen response desirable and their
    rejected one undesirable: the same completions, so the same trained tokens."""
    from lightning_rlhf import ComparisonDataModule, UnpairedDataModule

    path = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(args)))
    return (UnpairedDataModule if unpaired else ComparisonDataModule)(
        train_path=str(path),
        tokenizer_name_or_path=model_dir,
        val_fraction=0,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )


def run_pairs_ours(args: argparse.Namespace, model_dir: str, module, stage: str, unpaired: bool = False) -> dict:
    """``module`` (reward model or DPO) trained on the preference pairs (``unpaired``: read as KTO's records)."""
    seconds, _ = fit_lightning(args, module, pairs_datamodule(args, model_dir, unpaired))
    tokens, flops = pair_work(args, module.model, stage)
    return result(args, "lightning_rlhf", tokens, seconds, flops)


def run_shared_prompt_ours(args: argparse.Namespace, row: Row, model_dir: str, module, stage: str) -> dict:
    """Our reward model or DPO (``module``) on K-way comparisons, padded or (``row.layout`` shared) in the
    shared-prompt layout; the row holds every step's loss."""
    from lightning_rlhf import ComparisonDataModule

    path = Path(tempfile.mkdtemp()) / "comparisons.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in kway_comparisons(args)))
    shared = row.layout == "shared"
    data = ComparisonDataModule(
        train_path=str(path),
        tokenizer_name_or_path=model_dir,
        val_fraction=0,
        batch_size=args.batch_size,
        max_length=args.max_length,
        shared_prompt=shared,
        row_length=args.row_length,
    )
    losses: list[float] = []
    torch.manual_seed(0)  # the reward model's fresh head, built in fit: the same in both runs
    seconds, lengths = fit_lightning(args, module, data, losses=losses)
    name = "lightning_rlhf shared" if shared else "lightning_rlhf padded"
    flops = model_flops(module.model, lengths, stage)
    return {**result(args, name, sum(lengths), seconds, flops), "losses": losses}
