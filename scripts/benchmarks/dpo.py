"""``dpo``: our ``DPOModule`` vs TRL's ``DPOTrainer`` (a live frozen reference, β 0.1, sigmoid loss) on the same
initial weights and pairs; ``--lora`` adds ours with LoRA and the adapter-off reference, ``--reference-free`` ours with
SimPO and ORPO (no reference model: the peak memory shows it), ``--kto`` ours with KTO on the same pairs read as
unpaired records (the chosen response desirable, the rejected one undesirable; credited their tokens, not those of
the mismatched rows that estimate its reference point); with ``--shared-prompt`` ours padded vs shared prompt on
K-way comparisons."""

from __future__ import annotations

import argparse

import torch

from .common import Row, adamw, print_loss_difference, print_table, result, train_hf, trl_args, trl_name
from .data import preference_pairs
from .pairs import pair_work, run_pairs_ours, run_shared_prompt_ours


def plan(args: argparse.Namespace) -> list[Row]:
    if args.shared_prompt:
        return [Row(layout="padded"), Row(layout="shared")]
    lora = [Row(adapter="lora")] if args.lora else []
    free = [Row(loss_type="simpo"), Row(loss_type="orpo")] if args.reference_free else []
    kto = [Row(loss_type="kto")] if args.kto else []
    return [Row(), *lora, *free, *kto, Row(impl="trl")]


def measure(args: argparse.Namespace, row: Row, model_dir: str) -> dict:
    if row.impl == "trl":
        return run_trl(args, model_dir)
    from lightning_rlhf import DPOModule
    from lightning_rlhf.models.lora import LoraOptions

    lora = LoraOptions(r=args.lora_rank, alpha=2 * args.lora_rank) if row.adapter == "lora" else None
    module = DPOModule(model_dir, dtype=args.dtype, beta=0.1, loss_type=row.loss_type, optimizer=adamw(1e-5), lora=lora)
    if args.shared_prompt:
        return run_shared_prompt_ours(args, row, model_dir, module, "dpo")
    measured = run_pairs_ours(args, model_dir, module, "dpo", unpaired=row.loss_type == "kto")
    if lora is not None:
        measured["impl"] = f"lightning_rlhf lora r={args.lora_rank} (adapter-off reference)"
    if row.loss_type == "kto":
        measured["impl"] = "lightning_rlhf kto (unpaired)"
    elif row.loss_type != "sigmoid":
        measured["impl"] = f"lightning_rlhf {row.loss_type} (no reference)"
    return measured


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.shared_prompt:
        print_loss_difference(rows, "shared vs padded")
    if args.lora or args.reference_free or args.kto:
        print_table(rows, "peak_mem_mib")


def run_trl(args: argparse.Namespace, model_dir: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    trainer = DPOTrainer(
        model=model,
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        args=DPOConfig(**trl_args(args), learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"]),
        train_dataset=datasets.Dataset.from_list(preference_pairs(args)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    seconds = train_hf(args, trainer)
    tokens, flops = pair_work(args, model, "dpo")
    return result(args, trl_name(), tokens, seconds, flops)
