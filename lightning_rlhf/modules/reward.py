"""Reward model trained on K-way rankings (InstructGPT step 2; Ouyang et al. 2022, section 3.5).

The SFT model with its unembedding replaced by a freshly initialised linear layer to one scalar, read at the last
real token of prompt ⊕ response ⊕ EOS (see ``models/reward.py``). A batch holds whole prompts with all their K
responses, each scored once (with ``ComparisonDataModule(shared_prompt=True)`` the prompt is forwarded once for
all of them, ``data.shared_prompt``); the loss averages, per prompt, ``-log σ(r_w - r_l)`` over its ordered pairs
(``losses.ranking_loss``). After training, an optional offset makes the rewards of a reference set (the
demonstrations, from ``ComparisonDataModule(normalize_path=…)``) average 0; it is stored in the exported config
and subtracted at scoring time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.preference import ranking_loss
from lightning_rlhf.models.lora import (
    LoraOptions,
    apply_lora,
    check_fit_setup,
    drop_frozen_weights,
    export_trained,
    keep_frozen_weights_out_of_checkpoints,
    lora_hparams,
)
from lightning_rlhf.models.modes import evaluating
from lightning_rlhf.models.reward import OFFSET_KEY, TOKEN_KEY, load_reward_model, sequence_rewards
from lightning_rlhf.models.shared_forward import check_shared_prompt_attention, shared_rewards
from lightning_rlhf.training.memory import check_memory
from lightning_rlhf.training.optim import optimizer_config
from lightning_rlhf.training.strategies import (
    Rank0Load,
    clip_gradients,
    enable_activation_checkpointing,
    fully_shard_models,
    reset_float32,
)
from lightning_rlhf.validation import check_range


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5)


def _validation_metrics() -> nn.ModuleDict:
    # std comes from E[r²] - E[r]²: both means reduce exactly over ranks, a std metric would not.
    return nn.ModuleDict({name: MeanMetric() for name in ("loss", "accuracy", "margin", "reward", "reward_sq")})


class RewardModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: str = "float32",
        margin: float = 0.0,
        center_coef: float = 0.0,
        reward_token: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraOptions | None = None,
    ):
        """
        Args:
            model_name_or_path: the SFT export (a causal LM: its unembedding is replaced by a fresh scalar head),
                or a sequence-classification checkpoint with one label (its head is kept); ``None`` builds the
                embedded default from scratch.
            model_config: overrides of the embedded default's Llama config.
            dtype: parameter dtype, ``float32`` / ``bfloat16`` / ``float16``.
            margin: required reward gap in ``-log σ(r_w - r_l - margin)``.
            center_coef: weight of ``mean(r²)``, keeping rewards near 0 (Eisenstein et al. 2023).
            reward_token: a dedicated token appended to every sequence and read instead of the last real token;
                added to the tokenizer (and the embedding) if new.
            optimizer: built over the trainable parameters once the model exists.
            scheduler: stepped every optimiser step.
            export_dir: where the reward model and tokenizer are saved (``save_pretrained``) when fit ends.
            gradient_checkpointing: keep only each decoder block's input and recompute the block in backward
                (``strategies.enable_activation_checkpointing``); about one forward more per step.
            lora: train LoRA adapters (``peft``) on the frozen backbone, and the scalar head in full (``peft``'s
                ``modules_to_save``); checkpoints then hold only those (the base is rebuilt from
                ``model_name_or_path``), and the export holds the merged reward model and, in ``export_dir/adapter``,
                the adapter with the head. One device, DDP or FSDP2 (not FSDP1).
        """
        super().__init__()
        check_range("margin", margin, ">= 0", margin >= 0)
        check_range("center_coef", center_coef, ">= 0", center_coef >= 0)
        lora = lora_hparams(lora)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = load_tokenizer(model_name_or_path)
        if reward_token is not None:
            self.tokenizer.add_tokens([reward_token], special_tokens=True)
        self.model = None
        self.shared_prompt_checked = False
        self.val_metrics = _validation_metrics()
        # An embedded default's random base exists only in the checkpoint: it keeps it.
        self.checkpoint_trainable_only = lora is not None and model_name_or_path is not None
        if self.checkpoint_trainable_only:
            keep_frozen_weights_out_of_checkpoints(self)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp, load = self.hparams, Rank0Load(self)
        self.model = load_reward_model(hp.model_name_or_path, self.tokenizer, hp.dtype, hp.model_config, load.meta)
        # A stored offset belongs to the weights it was measured on; training changes them.
        setattr(self.model.config, OFFSET_KEY, 0.0)
        if hp.reward_token is not None:  # load_reward_model grew the embedding to the added token
            setattr(self.model.config, TOKEN_KEY, self.tokenizer.convert_tokens_to_ids(hp.reward_token))
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if hp.lora is not None:
            self.model = apply_lora(self.model, hp.lora, task_type="SEQ_CLS")
        fully_shard_models(self, self.model, load=load)
        check_memory(self, {"reward model": self.model})

    def _rewards(self, batch: dict[str, Tensor]) -> Tensor:
        """``(n,)`` raw rewards of the batch's responses, in the padded or the shared-prompt layout."""
        if "reward_index" not in batch:
            return sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"], subtract_offset=False)
        if not self.shared_prompt_checked:
            check_shared_prompt_attention(self.model, batch["input_ids"].device, hidden=True)
            self.shared_prompt_checked = True
        return shared_rewards(self.model, batch, subtract_offset=False)

    def _step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Loss and statistics of a batch: rewards ``(n,)`` over flat responses, margins ``(p,)`` over pairs."""
        rewards = self._rewards(batch)
        grouped = rewards[batch["response_index"].clamp(min=0)]  # (b, k); absent slots have rank -1: ignored
        loss = ranking_loss(grouped, batch["ranks"], self.hparams.margin, self.hparams.center_coef)
        pairs = batch["pairs"]
        margins = (rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).detach()  # (p,) better minus worse
        return {"loss": loss, "rewards": rewards.detach(), "margins": margins}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self._step(batch)
        rewards, margins = out["rewards"], out["margins"]
        log = {"batch_size": batch["ranks"].size(0)}
        self.log("train/loss", out["loss"], prog_bar=True, **log)
        self.log("train/accuracy", (margins > 0).float().mean(), prog_bar=True, **log)
        self.log("train/margin", margins.mean(), **log)
        self.log("train/reward_mean", rewards.mean(), **log)
        self.log("train/reward_std", rewards.std(correction=0), **log)
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        # Fresh states here, not only after compute(): states reset under trainer.validate's inference mode
        # could not be updated by a later fit's validation (run under no_grad).
        # In float32: bf16-true casts them with the module.
        reset_float32(self.val_metrics.values())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self._step(batch)
        metrics, margins, rewards = self.val_metrics, out["margins"], out["rewards"]
        metrics["loss"].update(out["loss"], weight=batch["ranks"].size(0))
        if margins.numel():
            metrics["accuracy"].update((margins > 0).float())  # each held-out ordered pair counts once
            metrics["margin"].update(margins)
        metrics["reward"].update(rewards)
        metrics["reward_sq"].update(rewards**2)

    def on_validation_epoch_end(self) -> None:
        values = {name: metric.compute() for name, metric in self.val_metrics.items()}  # reduced over ranks
        self.log("val/loss", values["loss"], prog_bar=True)
        self.log("val/accuracy", values["accuracy"], prog_bar=True)
        self.log("val/margin", values["margin"])
        self.log("val/reward_mean", values["reward"])
        self.log("val/reward_std", (values["reward_sq"] - values["reward"] ** 2).clamp(min=0).sqrt())

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_config(self.model, self.optimizer_factory, self.scheduler_factory)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> Tensor:
        """``(n,)`` raw rewards (no offset subtracted) of the batch's ``input_ids`` / ``attention_mask`` rows."""
        return sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"], subtract_offset=False)

    @torch.no_grad()
    def normalize(self, batches: Iterable[dict[str, Tensor]]) -> float:
        """Store the mean raw reward of the sequences in ``batches`` (``input_ids`` / ``attention_mask``, as the
        demonstration collator makes them) as the offset subtracted at scoring time; returns it.

        Called by every rank on the same batches (sharded models need all ranks in each forward), so all agree.
        Under a trainer the forwards go through the strategy's ``predict_step``: FSDP1 gathers the parameters
        outside its wrapped blocks (embedding, final norm, head) only inside the root module's forward.
        """
        predict = self.trainer.strategy.predict_step if self._trainer is not None else self.predict_step
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        with evaluating(self.model):
            for index, batch in enumerate(batches):
                batch = {key: batch[key].to(self.device) for key in ("input_ids", "attention_mask")}
                total += predict(batch, index).double().sum()
                count += batch["input_ids"].size(0)
        if count == 0:
            raise ValueError("reward normalisation got no sequences")
        offset = (total / count).item()
        setattr(self.model.config, OFFSET_KEY, offset)
        rank_zero_info(f"reward_offset = {offset:.4f}: mean raw reward of {count} normalisation sequences")
        return offset

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_trainable_only:
            drop_frozen_weights(self, checkpoint)

    def setup(self, stage: str) -> None:
        check_fit_setup(self, stage)

    def on_train_end(self) -> None:
        loader_fn = getattr(self.trainer.datamodule, "normalize_dataloader", None)
        loader = loader_fn() if loader_fn is not None else None
        if loader is not None:
            offset = self.normalize(loader)
            if self.logger is not None:
                self.logger.log_metrics({"train/reward_offset": offset}, step=self.global_step)
        export_trained(self)
