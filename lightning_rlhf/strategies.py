"""What the stage modules need from Lightning's sharding strategies (the sharding itself is Lightning's)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from torch.optim import Optimizer


def clip_gradients(
    module: L.LightningModule, optimizer: Optimizer, clip_val: float | None, algorithm: str | None
) -> None:
    """Gradient clipping that also works under ``FSDPStrategy``.

    FSDP's precision plugin refuses norm clipping, because the norm must be reduced over the shards: the root
    FSDP module's ``clip_grad_norm_`` does that. Every other strategy uses Lightning's own clipping.
    """
    if not clip_val:
        return
    if isinstance(module.trainer.strategy, FSDPStrategy) and algorithm in (None, "norm"):
        module.trainer.strategy.model.clip_grad_norm_(clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
