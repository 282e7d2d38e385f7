"""LoRA adapters through ``peft`` (Hu et al. 2021): options, wrapping a causal LM, and the two-part export.

With LoRA only the adapter (and any ``modules_to_save``) trains; the base weights stay frozen, so a frozen reference
is the same model with the adapter switched off (``model.disable_adapter()``) and no second copy is loaded.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.models import export_pretrained


@dataclass
class LoraOptions:
    """What ``peft.LoraConfig`` is built from."""

    r: int = 8
    """Rank of each adapter's update ``B A``."""
    alpha: int = 16
    """The update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get an adapter: names, or ``all-linear`` (every linear layer but the output layer)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. ``["lm_head"]``)."""


def lora_hparams(options: LoraOptions | dict | None) -> dict | None:
    """``options`` as a plain dict, for ``save_hyperparameters``: a checkpoint holding a dataclass would not load with
    ``torch.load(weights_only=True)``, which Lightning uses to resume."""
    return asdict(options) if isinstance(options, LoraOptions) else options


def apply_lora(model: PreTrainedModel, options: LoraOptions | dict) -> PeftModel:
    """``model`` with LoRA adapters, its base weights frozen; the adapters start at zero (``B = 0``), so the wrapped
    model computes exactly what ``model`` did."""
    options = LoraOptions(**options) if isinstance(options, dict) else options
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        modules_to_save=options.modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def export_lora(trainer, attribute: str, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
    """Export ``trainer.lightning_module.<attribute>``, a ``PeftModel``: the merged weights (loadable by plain
    ``transformers``) in ``directory`` and the adapter alone in ``directory/adapter``, in one atomic export.

    The merge runs on a copy, so the module keeps its adapter. Single device and DDP only (every rank holds the
    whole model); global rank 0 writes, all ranks wait.
    """
    if trainer.is_global_zero:
        model = getattr(trainer.lightning_module, attribute)
        merged = copy.deepcopy(model).merge_and_unload()
        export_pretrained(merged, tokenizer, directory, adapter=model)
    trainer.strategy.barrier("export")


def check_lora_strategy(trainer) -> None:
    """LoRA is not wired for sharded strategies yet: refuse them before training rather than export wrong weights."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
        raise ValueError(
            f"lora is supported on one device and under DDP, not under {type(trainer.strategy).__name__}: "
            "drop the lora option or use strategy: ddp"
        )
