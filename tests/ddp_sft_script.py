"""Run by tests/test_cli.py: a 2-process DDP SFT fit on CPU that reports what each rank saw and holds, and how many
sources each rank tokenized (only local rank 0 should: the other reads its cache).

python tests/ddp_sft_script.py OUT.json ROOT_DIR
"""

import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_rlhf import DemonstrationDataModule, SFTModule
from lightning_rlhf.data import cache
from tests.helpers import TINY_CONFIG, finish

BUILDS = []
build = cache._build
cache._build = lambda *args, **kwargs: BUILDS.append(args[1]) or build(*args, **kwargs)  # count, then build


class Probe(Callback):
    """Records this rank's first batch and the real tokens it trained on."""

    def __init__(self):
        self.first_batch_fingerprint, self.local_tokens = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch_fingerprint is None:
            ids = batch["input_ids"].flatten()
            self.first_batch_fingerprint = int((ids * torch.arange(1, len(ids) + 1)).sum())
        self.local_tokens += int(batch["attention_mask"].sum())


def main(out_path: str, root: str) -> None:
    L.seed_everything(0)
    probe = Probe()
    module = SFTModule(model_config=TINY_CONFIG, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = DemonstrationDataModule(batch_size=4, max_length=32, val_fraction=0, cache_dir=f"{root}/cache")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, data)
    checksum = torch.tensor([sum(p.double().sum().item() for p in module.model.parameters())])
    gathered = {
        "checksums": module.all_gather(checksum).flatten().tolist(),
        "local_tokens": module.all_gather(torch.tensor(probe.local_tokens)).flatten().tolist(),
        "first_batches": module.all_gather(torch.tensor(probe.first_batch_fingerprint)).flatten().tolist(),
        "builds": module.all_gather(torch.tensor(len(BUILDS))).flatten().tolist(),
    }
    finish(trainer, out_path, {**gathered, "world_size": trainer.world_size, "tokens_seen": int(module.tokens_seen)})


if __name__ == "__main__":
    main(*sys.argv[1:])
