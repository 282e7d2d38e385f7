"""Run by tests/test_distributed.py: SFT, reward model and DPO fitted on 2 CPU processes with DDP, then from the same
start with FSDP2 (``ModelParallelStrategy``), each exporting its model.

    python tests/fsdp2_script.py ROOT_DIR SFT_EXPORT COMPARISONS.jsonl DEMONSTRATIONS.jsonl

Writes ROOT_DIR/{sft,rm,dpo}_{ddp,fsdp2}: 3 steps each, gradient norm clipped at 1, the reward model normalised
on the demonstrations.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_rlhf import ComparisonDataModule, DemonstrationDataModule, DPOModule, RewardModule, SFTModule
from tests.helpers import end_distributed


def main(root: str, sft_dir: str, comparisons: str, demonstrations: str) -> None:
    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2)

    stages = {
        "sft": lambda export: (
            SFTModule(sft_dir, optimizer=adamw, export_dir=export),
            DemonstrationDataModule(train_path=demonstrations, tokenizer_name_or_path=sft_dir, batch_size=4,
                                    max_length=48, val_fraction=0),
        ),
        "rm": lambda export: (
            RewardModule(sft_dir, optimizer=adamw, export_dir=export),
            ComparisonDataModule(train_path=comparisons, tokenizer_name_or_path=sft_dir, batch_size=4, max_length=48,
                                 val_fraction=0, normalize_path=demonstrations),
        ),
        "dpo": lambda export: (
            DPOModule(sft_dir, optimizer=adamw, export_dir=export),
            ComparisonDataModule(train_path=comparisons, tokenizer_name_or_path=sft_dir, batch_size=4, max_length=48,
                                 val_fraction=0),
        ),
    }  # fmt: skip
    for stage, build in stages.items():
        for name, strategy in (
            ("ddp", "ddp"),
            ("fsdp2", ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)),
        ):
            L.seed_everything(0)
            module, data = build(f"{root}/{stage}_{name}")
            L.Trainer(
                accelerator="cpu", devices=2, strategy=strategy, max_steps=3, gradient_clip_val=1.0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=root, limit_val_batches=0,
            ).fit(module, data)  # fmt: skip
    end_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
