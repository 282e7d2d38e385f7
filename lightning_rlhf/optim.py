"""Optimisers for the stage modules, injected as callables (LightningCLI's ``OptimizerCallable`` style)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn


def optimizer_config(
    model: nn.Module, optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None
) -> dict[str, Any]:
    """``configure_optimizers``' answer: the optimiser over ``model``'s trainable parameters only (frozen or
    reference weights never enter it), and the scheduler, if any, stepped every optimiser step."""
    built = optimizer(p for p in model.parameters() if p.requires_grad)
    if scheduler is None:
        return {"optimizer": built}
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler(built), "interval": "step"}}
