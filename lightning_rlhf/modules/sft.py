"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Next-token loss on prompt ⊕ response, counted on response tokens only by default: the prompt is given,
not demonstrated. The loss is the mean over all scored tokens of the batch (token-weighted, as in
``transformers``), and validation perplexity is ``exp`` of the token-weighted mean over the whole set.
Packed batches (``DemonstrationDataModule(packing=True)``, with ``position_ids``) score the same tokens, so give the
same loss and metrics.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.tokens import IGNORE_INDEX, masked_mean
from lightning_rlhf.models.causal_lm import (
    check_packed_attention,
    forward_logits,
    load_causal_lm,
    packed_logits,
    shifted_logprobs,
)
from lightning_rlhf.models.lora import (
    LoraOptions,
    apply_lora,
    check_fit_setup,
    drop_frozen_weights,
    export_trained,
    keep_frozen_weights_out_of_checkpoints,
    lora_hparams,
)
from lightning_rlhf.training.memory import check_memory
from lightning_rlhf.training.optim import optimizer_config
from lightning_rlhf.training.strategies import (
    Rank0Load,
    clip_gradients,
    enable_activation_checkpointing,
    fully_shard_models,
    reset_float32,
)


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)


def sft_loss_inputs(batch: dict[str, Tensor], loss_on: str) -> Tensor:
    """The labels to score: the batch's (response only) or every real token when ``loss_on="all"``; in a packed
    batch not a sequence's first token, which would be predicted from the sequence before it."""
    if loss_on == "response":
        return batch["labels"]
    unscored = batch["attention_mask"] == 0
    if "position_ids" in batch:
        unscored |= batch["position_ids"] == 0
    return batch["input_ids"].masked_fill(unscored, IGNORE_INDEX)


class SFTModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: str = "float32",
        loss_on: Literal["response", "all"] = "response",
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraOptions | None = None,
    ):
        """
        Args:
            model_name_or_path: local Hugging Face directory or hub name; ``None`` builds the embedded default.
            model_config: overrides of the embedded default's Llama config (e.g. ``{"num_hidden_layers": 4}``).
            dtype: parameter dtype, ``float32`` / ``bfloat16`` / ``float16``.
            loss_on: ``response`` (prompt masked) or ``all`` tokens.
            optimizer: built over the trainable parameters once the model exists.
            scheduler: stepped every optimiser step.
            export_dir: where the trained model and tokenizer are saved (``save_pretrained``) when fit ends.
            gradient_checkpointing: keep only each decoder block's input and recompute the block in backward
                (``strategies.enable_activation_checkpointing``); about one forward more per step.
            lora: train LoRA adapters (``peft``) on the frozen model instead of every weight; the export then holds
                the merged model and, in ``export_dir/adapter``, the adapter alone. One device, DDP or FSDP2 (not
                FSDP1).
        """
        super().__init__()
        if loss_on not in ("response", "all"):
            raise ValueError(f"loss_on={loss_on!r} must be 'response' or 'all'")
        lora = lora_hparams(lora)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.model = None
        self.packing_checked = False
        self.val_loss = MeanMetric()
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        # With LoRA, checkpoints hold the adapters only: the frozen base is rebuilt from model_name_or_path (an
        # embedded default's random base exists only in the checkpoint: it keeps it).
        self.checkpoint_trainable_only = lora is not None and model_name_or_path is not None
        if self.checkpoint_trainable_only:
            keep_frozen_weights_out_of_checkpoints(self)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp, load = self.hparams, Rank0Load(self)
        self.model = load_causal_lm(hp.model_name_or_path, self.tokenizer, hp.dtype, hp.model_config, load.meta)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if hp.lora is not None:
            self.model = apply_lora(self.model, hp.lora)
        fully_shard_models(self, self.model, load=load)
        check_memory(self, {"policy": self.model})

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "position_ids" in batch:  # packed
            if not self.packing_checked:
                check_packed_attention(self.model, batch["input_ids"].device)
                self.packing_checked = True
            logits = packed_logits(self.model, batch["input_ids"], batch["position_ids"])
        else:
            logits = forward_logits(self.model, batch["input_ids"], batch["attention_mask"])
        logprobs, mask = shifted_logprobs(logits, sft_loss_inputs(batch, self.hparams.loss_on))
        return -masked_mean(logprobs, mask), mask.sum()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, n_scored = self._loss(batch)
        self.tokens_seen += self.all_gather(batch["attention_mask"].sum()).sum()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/tokens_seen", self.tokens_seen.float())
        self.log("train/scored_tokens", n_scored.float())
        return loss

    def on_validation_epoch_start(self) -> None:
        # Reset here too: a state last reset under trainer.validate's inference mode cannot be updated later. In
        # float32: bf16-true casts the states with the module.
        reset_float32([self.val_loss])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, n_scored = self._loss(batch)
        self.val_loss.update(loss, weight=n_scored)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)  # compute() already reduced over ranks
        self.log("val/ppl", torch.exp(loss))
        self.val_loss.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_config(self.model, self.optimizer_factory, self.scheduler_factory)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_trainable_only:
            drop_frozen_weights(self, checkpoint)

    def setup(self, stage: str) -> None:
        check_fit_setup(self, stage)

    def on_train_end(self) -> None:
        export_trained(self)
