"""LoRA adapters through ``peft`` (Hu et al. 2021): options, wrapping a causal LM, and the two-part export.

With LoRA only the adapter (and any ``modules_to_save``) trains; the base weights stay frozen, so a frozen reference
is the same model with the adapter switched off (``model.disable_adapter()``) and no second copy is loaded.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.models.export import check_export_before_fit, export_from_trainer, export_pretrained


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


def apply_lora(model: PreTrainedModel, options: LoraOptions | dict, task_type: str = "CAUSAL_LM") -> PeftModel:
    """``model`` with LoRA adapters, its base weights frozen; the adapters start at zero (``B = 0``), so the wrapped
    model computes exactly what ``model`` did.

    ``task_type="SEQ_CLS"`` for a reward or value model: ``peft`` then adds its scalar head (``score``) to
    ``modules_to_save``, so the head trains in full (a trained copy beside the original) and is saved with the adapter.
    """
    options = LoraOptions(**options) if isinstance(options, dict) else options
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        modules_to_save=options.modules_to_save,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def export_lora(trainer, attribute: str, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
    """Export ``trainer.lightning_module.<attribute>``, a ``PeftModel``: the merged weights (loadable by plain
    ``transformers``) in ``directory`` and the adapter alone in ``directory/adapter``, in one atomic export.

    The merge runs on a copy, so the module keeps its adapter. Under FSDP2 every rank gathers the full state dict (a
    collective) and global rank 0 loads it into a whole copy first; under DDP every rank holds the whole model.
    Global rank 0 writes, all ranks wait.
    """
    model = getattr(trainer.lightning_module, attribute)
    state = None
    if trainer.lightning_module.device_mesh is not None:  # ModelParallelStrategy (FSDP2): gather DTensor shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        whole = model if state is None else whole_copy(model, state)
        export_pretrained(copy.deepcopy(whole).merge_and_unload(), tokenizer, directory, adapter=whole)
    trainer.strategy.barrier("export")


def check_fit_setup(module, stage: str) -> None:
    """What every stage's module checks in ``setup``: a strategy LoRA runs under, and, before training rather than
    after it, an export directory the run may write."""
    if module.hparams.lora is not None:
        check_lora_strategy(module.trainer)
    if stage == "fit" and module.hparams.export_dir:
        check_export_before_fit(module.trainer, module.hparams.export_dir)


def export_trained(module, attribute: str = "model") -> None:
    """At the end of training, export ``module.<attribute>`` to ``module.hparams.export_dir`` (if set): merged and
    adapter (``export_lora``) with LoRA, else the model as trained (``export.export_from_trainer``)."""
    directory = module.hparams.export_dir
    if directory and module.hparams.lora is not None:
        export_lora(module.trainer, attribute, module.tokenizer, directory)
    elif directory:
        export_from_trainer(module.trainer, attribute, module.tokenizer, directory)


def whole_copy(model: PeftModel, state: dict[str, torch.Tensor]) -> PeftModel:
    """An unsharded ``PeftModel`` of ``model``'s architecture and adapter config holding ``state``, its full state
    dict. ``fully_shard`` swaps a module's class for an ``FSDP<Class>`` subclass: the copy is built from the original
    class."""
    from torch.distributed.fsdp import FSDPModule

    base = model.get_base_model()
    base_class = type(base).__bases__[-1] if isinstance(base, FSDPModule) else type(base)
    dtype = next(iter(state.values())).dtype
    whole = get_peft_model(base_class(base.config).to(dtype), copy.deepcopy(model.peft_config["default"]))
    whole.load_state_dict(state)
    return whole


def check_lora_strategy(trainer) -> None:
    """Refuse LoRA under FSDP1 (``FSDPStrategy``) before training: FSDP1 flattens each unit's parameters into one
    flat parameter with a single ``requires_grad``, so a frozen base and trainable adapters in the same unit need
    ``use_orig_params=True`` and an export that gathers them; neither is wired or tested. One device, DDP and FSDP2
    (``ModelParallelStrategy``, which shards per parameter) are tested with 2 processes."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            "lora is supported on one device, under DDP (strategy: ddp) and under FSDP2 (strategy: "
            "ModelParallelStrategy), not under FSDPStrategy (FSDP1): its flat parameters cannot mix the frozen base "
            "with trainable adapters (without use_orig_params=True, not wired or tested here). Use "
            "ModelParallelStrategy to shard, or drop the lora option"
        )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model inside a ``PeftModel`` (its adapters in place and active), or ``model`` itself: for
    code that reaches into the architecture (``model.base_model`` is the backbone there, ``model.score`` the head)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def frozen_weight_names(module: torch.nn.Module) -> set[str]:
    """State-dict keys of ``module``'s frozen parameters (tied duplicates included)."""
    return {name for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad}


def keep_frozen_weights_out_of_checkpoints(module) -> None:
    """With LoRA, let a checkpoint without the frozen base weights load into ``module`` (a ``LightningModule``), whose
    ``configure_model`` rebuilds them from their path; ``drop_frozen_weights`` leaves them out when saving.

    Loading stays strict for everything else: only missing frozen weights are forgiven (``load_state_dict`` post
    hook, checked before a strict load raises), so a checkpoint lacking an adapter or a trained head still fails.
    """

    def allow_missing_frozen(module, incompatible_keys) -> None:
        frozen = frozen_weight_names(module)
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in frozen]

    module.register_load_state_dict_post_hook(allow_missing_frozen)


def drop_frozen_weights(module: torch.nn.Module, checkpoint: dict) -> None:
    """``on_save_checkpoint``'s part with LoRA: only trainable parameters (adapters, ``modules_to_save``, a full
    value model) and buffers stay in ``checkpoint["state_dict"]``; the frozen base is rebuilt from its path."""
    frozen = frozen_weight_names(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
