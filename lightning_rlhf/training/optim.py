"""Optimisers for the stage modules, injected as callables (LightningCLI's ``OptimizerCallable`` style)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def policy_value_groups(policy: nn.Module, value: nn.Module | None, value_lr: float | None) -> list[dict[str, Any]]:
    """Parameter groups of the policy's and (if any) the value function's trainable parameters, clipped apart
    (``clip_grad_norms``); the value function's at ``value_lr`` when given."""
    groups = [{"params": trainable(policy)}]
    if value is not None:
        groups.append({"params": trainable(value), **({"lr": value_lr} if value_lr is not None else {})})
    return groups


def optimizer_config(
    model: nn.Module | list[dict[str, Any]], optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None
) -> dict[str, Any]:
    """``configure_optimizers``' answer: the optimiser over ``model``'s trainable parameters only (frozen or
    reference weights never enter it), or over the given parameter groups (``[{"params": …, "lr": …}, …]``), and
    the scheduler, if any, stepped every optimiser step."""
    built = optimizer(trainable(model) if isinstance(model, nn.Module) else model)
    if scheduler is None:
        return {"optimizer": built}
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler(built), "interval": "step"}}


def clip_grad_norms(optimizer: torch.optim.Optimizer, max_norm: float | None) -> list[Tensor]:
    """Clip the gradients of each parameter group of ``optimizer`` to norm ``max_norm``, every group on its own
    (``None``: no clipping); returns each group's norm before clipping, as a plain tensor (reduced over the shards
    of FSDP2's DTensors, which ``clip_grad_norm_`` handles)."""
    norms = []
    for group in optimizer.param_groups:
        norm = torch.nn.utils.clip_grad_norm_(group["params"], max_norm or math.inf)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return norms


def manual_step(module: L.LightningModule, loss: Tensor) -> list[Tensor]:
    """One manual-optimisation step of ``module`` on ``loss`` (its scheduler stepped too); returns the gradient norms
    before clipping to ``hparams.max_grad_norm``, one per parameter group (the policy's and the value function's,
    clipped apart: ``clip_grad_norms``)."""
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    optimizer.zero_grad()
    module.manual_backward(loss)
    norms = clip_grad_norms(optimizer.optimizer, module.hparams.max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return norms
