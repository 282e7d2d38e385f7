"""``sft``: our ``SFTModule`` vs TRL's ``SFTTrainer`` on the same initial weights and demonstrations, prompt masked;
with ``--packing`` ours padded vs packed instead, on the same batches, each row with every step's loss."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .common import Row, adamw, fit_lightning, model_flops, print_loss_difference, result, train_hf, trl_args, trl_name
from .data import demonstrations_path


def plan(args: argparse.Namespace) -> list[Row]:
    if args.packing:
        return [Row(), Row(layout="packed")]
    return [Row(), Row(impl="trl")]


def measure(args: argparse.Namespace, row: Row, model_dir: str) -> dict:
    return run_trl(args, model_dir) if row.impl == "trl" else run_ours(args, model_dir, row.layout == "packed")


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.packing:
        print_loss_difference(rows, "packed vs padded")


def run_ours(args: argparse.Namespace, model_dir: str, packing: bool) -> dict:
    from lightning_rlhf import DemonstrationDataModule, SFTModule

    module = SFTModule(model_dir, dtype=args.dtype, optimizer=adamw(1e-4))
    data = DemonstrationDataModule(
        train_path=demonstrations_path(args),
        tokenizer_name_or_path=model_dir,
        val_fraction=0,
        batch_size=args.batch_size,
        max_length=args.max_length,
        packing=packing,
    )
    losses: list[float] = []
    seconds, lengths = fit_lightning(args, module, data, losses=losses)
    name = "lightning_rlhf packed" if packing else "lightning_rlhf"
    row = result(args, name, sum(lengths), seconds, model_flops(module.model, lengths, "sft"))
    return {**row, "losses": losses} if args.packing else row


def run_trl(args: argparse.Namespace, model_dir: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    records = [json.loads(line) for line in Path(demonstrations_path(args)).read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    config = SFTConfig(**trl_args(args), learning_rate=1e-4, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    batches: list[list[int]] = []
    inner = trainer.data_collator

    def counting_collator(examples):
        batch = inner(examples)
        batches.append(batch["attention_mask"].sum(-1).tolist())
        return batch

    trainer.data_collator = counting_collator
    seconds = train_hf(args, trainer)
    lengths = [n for batch in batches[args.warmup : args.warmup + args.steps] for n in batch]
    return result(args, trl_name(), sum(lengths), seconds, model_flops(model, lengths, "sft"))
