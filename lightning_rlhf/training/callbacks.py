"""Callbacks the pipeline adds to a stage's ``fit`` (``--trainer.callbacks+=lightning_rlhf.training.callbacks.…``)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class BestWeights(Callback):
    """Keeps a copy of the module's weights at its best validation of ``monitor`` and loads them back when training
    ends, before the module's own ``on_train_end`` exports them (Lightning calls the callbacks' hook first). With
    ``EarlyStopping`` the export is then the best model, not the one ``patience`` validations past it.

    The copy is the whole state dict on the CPU: one device, or DDP (each rank keeps its own). Not for sharded
    models (FSDP), whose ``state_dict`` is each rank's shard."""

    def __init__(self, monitor: str, mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"BestWeights mode={mode!r}: 'min' (a loss) or 'max' (an accuracy)")
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def better(self, value: float) -> bool:
        return self.best is None or (value < self.best if self.mode == "min" else value > self.best)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:  # else a misspelt monitor would silently export the last weights
            logged = ", ".join(sorted(name for name in trainer.callback_metrics if name.startswith("val")))
            raise RuntimeError(
                f"BestWeights: validation logged no {self.monitor!r}; monitor one of the metrics it "
                f"logged: {logged or 'none'}"
            )
        if not self.better(float(value)):
            return
        self.best = float(value)
        self.state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in pl_module.state_dict().items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)
            rank_zero_info(f"BestWeights: the weights of the best {self.monitor} ({self.best:.4f}) restored")
