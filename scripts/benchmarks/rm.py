"""``rm``: our ``RewardModule`` vs TRL's ``RewardTrainer`` (a fresh scalar head on the backbone) on the same initial
weights and best-vs-worst pairs; with ``--shared-prompt`` ours padded vs shared prompt on K-way comparisons."""

from __future__ import annotations

import argparse

import torch

from .common import Row, adamw, print_loss_difference, result, train_hf, trl_args, trl_name
from .data import preference_pairs
from .pairs import pair_work, run_pairs_ours, run_shared_prompt_ours


def plan(args: argparse.Namespace) -> list[Row]:
    if args.shared_prompt:
        return [Row(layout="padded"), Row(layout="shared")]
    return [Row(), Row(impl="trl")]


def measure(args: argparse.Namespace, row: Row, model_dir: str) -> dict:
    if row.impl == "trl":
        return run_trl(args, model_dir)
    from lightning_rlhf import RewardModule

    module = RewardModule(model_dir, dtype=args.dtype, optimizer=adamw(1e-5))
    if args.shared_prompt:
        return run_shared_prompt_ours(args, row, model_dir, module, "rm")
    return run_pairs_ours(args, model_dir, module, "rm")


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.shared_prompt:
        print_loss_difference(rows, "shared vs padded")


def run_trl(args: argparse.Namespace, model_dir: str) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=getattr(torch, args.dtype)
    )
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**trl_args(args), learning_rate=1e-5),
        train_dataset=datasets.Dataset.from_list(preference_pairs(args)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    seconds = train_hf(args, trainer)
    tokens, flops = pair_work(args, model, "rm")
    return result(args, trl_name(), tokens, seconds, flops)
