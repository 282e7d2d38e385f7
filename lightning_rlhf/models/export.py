"""Hugging Face export of a trained model: ``save_pretrained`` into a staging directory, fsynced, then renamed over
the target, so a crash never leaves half an export and an earlier complete one survives. The marker and the target
checks are ``io``'s; a directory without our marker is never replaced."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_rlhf.io import EXPORT_MARKER, check_export_target, fsync_path


def export_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | os.PathLike,
    state_dict: dict[str, Tensor] | None = None,
    adapter: torch.nn.Module | None = None,
) -> Path:
    """Write ``save_pretrained`` output for model and tokenizer atomically, replacing only an earlier export of ours.

    Everything is written into a temporary sibling directory first, with ``EXPORT_MARKER``, and fsynced; it then
    replaces ``directory`` by rename. A kill between moving the previous export aside and renaming the new one in
    leaves the previous one under ``.NAME.old-*``, which the next export or ``check_export_target`` puts back.
    ``state_dict`` replaces the model's own weights (e.g. the full weights gathered from a sharded model).
    ``adapter`` (a ``peft`` model) is written by its own ``save_pretrained`` into ``directory/adapter``, in the same
    atomic export.
    """
    target = check_export_target(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (staging / EXPORT_MARKER).write_text("written by lightning_rlhf.models.export.export_pretrained\n")
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if adapter is not None:
            adapter.save_pretrained(staging / "adapter")
        for written in staging.rglob("*"):
            if written.is_file():
                fsync_path(written)
        fsync_path(staging)
        if target.exists():
            previous = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(previous)
            staging.rename(target)
            fsync_path(target.parent)
            shutil.rmtree(previous)
        else:
            staging.rename(target)
        fsync_path(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def tied_duplicates(model: torch.nn.Module) -> list[str]:
    """Names of parameters that are another parameter under a second name (a tied ``lm_head.weight``)."""
    first: dict[int, str] = {}
    duplicates = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            duplicates.append(name)
        first.setdefault(id(param), name)
    return duplicates


def check_export_before_fit(trainer, directory: str | os.PathLike) -> None:
    """``check_export_target`` against the run's own directories (root, logs, checkpoints), on global rank 0, when
    fit starts: a target that the export at the end would refuse stops the run before it trains."""
    dirs = [trainer.default_root_dir, trainer.log_dir]  # log_dir is a broadcast: every rank must ask for it
    dirs += [getattr(callback, "dirpath", None) for callback in trainer.checkpoint_callbacks]
    if trainer.is_global_zero:
        check_export_target(directory, [d for d in dirs if d])


def export_from_trainer(trainer, attribute: str, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike):
    """Export ``trainer.lightning_module.<attribute>`` in Hugging Face format, whatever the strategy.

    The strategy gathers the full weights (FSDP and FSDP2 included; a collective, so every rank calls this), global
    rank 0 writes them with ``export_pretrained``, and all ranks wait for the export to exist before going on.
    """
    if getattr(trainer.strategy, "_state_dict_type", "full") != "full":
        raise ValueError(
            "exporting a Hugging Face model needs the full state dict: set the strategy's state_dict_type='full'"
        )
    if trainer.lightning_module.device_mesh is not None:  # ModelParallelStrategy (FSDP2): gather DTensor shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(trainer.lightning_module, options=options)
    else:
        state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        model = getattr(trainer.lightning_module, attribute)
        prefix = f"{attribute}."
        weights = {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}
        for name in tied_duplicates(model):  # gathered copies no longer share memory: save_pretrained would keep both
            weights.pop(name, None)
        export_pretrained(model, tokenizer, directory, state_dict=weights)
    trainer.strategy.barrier("export")
