"""Run by tests/test_distributed.py: reward model and DPO (precomputed reference) fitted with DDP (default: on 2 CPU
processes).

    python tests/ddp_preference_script.py OUT.json ROOT_DIR SFT_EXPORT TRAIN.jsonl VAL.jsonl [cpu|cuda] [DEVICES]

Each stage trains 3 steps, then validates; rank 0 writes what every rank holds and what validation reported.
"""

import sys

import lightning as L
import torch

from lightning_rlhf import ComparisonDataModule, DPOModule, RewardModule
from tests.helpers import finish


def checksum(model) -> float:
    return sum(p.double().sum().item() for p in model.parameters())


def fit_and_validate(module, data, root, accelerator: str, devices: int):
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    metrics = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=root,
    ).validate(module, data, verbose=False)[0]
    return trainer, {name: float(value) for name, value in metrics.items()}


def main(
    out_path: str, root: str, sft_dir: str, train: str, val: str, accelerator: str = "cpu", devices: str = "2"
) -> None:
    def data():
        return ComparisonDataModule(train_path=train, val_path=val, tokenizer_name_or_path=sft_dir, batch_size=4)

    L.seed_everything(0)
    rm = RewardModule(sft_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), export_dir=f"{root}/rm")
    trainer, rm_metrics = fit_and_validate(rm, data(), root, accelerator, int(devices))
    rm_checksums = rm.all_gather(torch.tensor([checksum(rm.model)])).flatten().tolist()

    L.seed_everything(0)
    dpo = DPOModule(
        sft_dir,
        precompute_ref_logprobs=True,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        export_dir=f"{root}/dpo",
    )
    _, dpo_metrics = fit_and_validate(dpo, data(), root, accelerator, int(devices))
    report = {
        "world_size": trainer.world_size,
        "rm_checksums": rm_checksums,
        "rm_val": rm_metrics,
        "dpo_checksums": dpo.all_gather(torch.tensor([checksum(dpo.model)])).flatten().tolist(),
        "dpo_cache_sizes": dpo.all_gather(torch.tensor(len(dpo.ref_cache))).flatten().tolist(),
        "dpo_val": dpo_metrics,
    }
    finish(trainer, out_path, report)


if __name__ == "__main__":
    main(*sys.argv[1:])
