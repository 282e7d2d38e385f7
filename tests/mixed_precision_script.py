"""Run by tests/test_distributed.py: SFT under FSDP2 (``ModelParallelStrategy``) with ``precision="bf16-mixed"``,
reporting the dtypes of what is stored and what is computed.

    python tests/mixed_precision_script.py OUT.json ROOT_DIR [cpu|cuda] [DEVICES]
"""

import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_rlhf import DemonstrationDataModule, SFTModule
from tests.helpers import TINY_CONFIG, finish


class Probe(Callback):
    """The dtype of a block's weight while the block computes, and of the stored shards and their gradients."""

    def __init__(self):
        self.report: dict[str, str] = {}

    def on_train_start(self, trainer, pl_module):
        layer = pl_module.model.model.layers[0]

        def record(module, args):
            self.report["compute_weight"] = str(module.mlp.up_proj.weight.dtype)
            self.report["compute_input"] = str(args[0].dtype)

        layer.register_forward_pre_hook(record)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        weight = pl_module.model.model.layers[0].mlp.up_proj.weight
        self.report["stored_weight"] = str(weight.to_local().dtype)
        self.report["stored_grad"] = str(weight.grad.to_local().dtype)
        self.report["optimizer_state"] = str(next(iter(optimizer.state.values()), {}).get("exp_avg", weight).dtype)


def main(out_path: str, root: str, accelerator: str = "cpu", devices: str = "2") -> None:
    L.seed_everything(0)
    probe = Probe()
    module = SFTModule(model_config=TINY_CONFIG, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=int(devices),
        precision="bf16-mixed",
        strategy=ModelParallelStrategy(data_parallel_size=int(devices), tensor_parallel_size=1),
        max_steps=2,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, DemonstrationDataModule(batch_size=4, max_length=32, val_fraction=0))
    finish(trainer, out_path, probe.report)


if __name__ == "__main__":
    main(*sys.argv[1:])
