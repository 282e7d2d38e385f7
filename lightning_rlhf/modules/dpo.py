"""Direct preference optimisation from the SFT model, without a reward model (Rafailov et al. 2023).

``loss = -E[log σ(β log π_θ(y_w|x)/π_ref(y_w|x) - β log π_θ(y_l|x)/π_ref(y_l|x))]`` (or a variant of
``losses.DPO_LOSSES``), with π_ref the frozen starting point. A comparison of K ranked responses gives all its
ordered pairs (ties give none); as in the InstructGPT ranking loss, each prompt weighs the same, its pairs
sharing its weight, so a prompt with many responses does not dominate the batch. All responses of a batch go
through the policy in one forward pass (the collator has already concatenated them; with
``ComparisonDataModule(shared_prompt=True)`` each prompt is forwarded once for all its responses, policy and
reference alike, ``data.shared_prompt``). ``nll_weight`` adds RPO's
likelihood term on each prompt's best responses (Pang et al. 2024), which keeps DPO on off-policy comparisons
from pushing probability onto tokens seen in neither response. ``loss_type="kto"`` learns instead from unpaired
feedback (``UnpairedDataModule``): each completion labelled desirable or not, against KTO's reference point
(``losses.kto_loss``), each labelled completion weighing the same; the rows that estimate the reference point go
through policy and reference without autograd.

The reference is either a live frozen copy (eval mode, no grad, outside the optimiser and out of checkpoints,
rebuilt from ``model_name_or_path`` in ``configure_model``), or, with ``lora``, the policy with its adapter switched
off (no second copy), or, with ``precompute_ref_logprobs``, a temporary
model whose log-probs are computed once over the DataModule's train and validation data when fit starts and then
freed. Cached values are keyed by the content of each row (its real token ids and labels), not by its position,
so they are right whatever the shuffling, the batch composition, the padding or the rank that meets the row.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.preference import (
    DPO_LOSSES,
    LENGTH_NORMALISED,
    REFERENCE_FREE,
    dpo_loss,
    kto_loss,
    kto_reference_point,
)
from lightning_rlhf.models.causal_lm import disable_dropout, keep_out_of_checkpoints, load_causal_lm
from lightning_rlhf.models.lora import (
    LoraOptions,
    apply_lora,
    check_fit_setup,
    drop_frozen_weights,
    export_trained,
    keep_frozen_weights_out_of_checkpoints,
    lora_hparams,
)
from lightning_rlhf.models.shared_forward import check_shared_prompt_attention, response_logprobs
from lightning_rlhf.modules.preference_batches import pair_layout, row_keys
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

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "logps/chosen", "logps/rejected")
LOSS_TYPES = (*DPO_LOSSES, "kto")


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5)


def mean_token_nll(logps: Tensor, counts: Tensor, rows: Tensor) -> Tensor:
    """The per-token negative log-likelihood of the responses the boolean ``(n,)`` ``rows`` marks, of ``(n,)`` summed
    ``logps`` over ``counts`` tokens, averaged over those responses; 0 (still in the graph) when none is marked."""
    return -(logps / counts.clamp(min=1) * rows).sum() / rows.sum().clamp(min=1)


class DPOModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        ref_model_name_or_path: str | None = None,
        dtype: str = "float32",
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto"] = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        nll_weight: float = 0.0,
        precompute_ref_logprobs: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraOptions | None = None,
    ):
        """
        Args:
            model_name_or_path: the SFT export (Hugging Face directory or hub name); policy and reference start here.
            ref_model_name_or_path: the frozen reference, if not ``model_name_or_path`` (iterated DPO: the SFT model
                while the policy continues from the last round's); it must share the policy's tokenizer.
            dtype: parameter dtype, ``float32`` / ``bfloat16`` / ``float16``.
            beta: strength of the implicit KL constraint to the reference (IPO: its τ).
            loss_type: ``sigmoid`` (DPO), ``hinge`` (SLiC), ``ipo`` (on per-token averaged log-probs), ``robust``, or
                reference-free, on per-token averaged log-probs, with no reference model built or loaded: ``simpo``
                (SimPO), ``orpo`` (ORPO: the chosen response's NLL plus β · the odds-ratio loss); or ``kto`` (KTO), on
                unpaired feedback (``UnpairedDataModule``), against the reference.
            label_smoothing: assumed rate of flipped labels (``sigmoid``: cDPO, ``robust``: rDPO).
            simpo_gamma: SimPO's target margin γ between the chosen and the rejected response's β-scaled log-probs.
            desirable_weight, undesirable_weight: KTO's λ_D and λ_U (the paper: λ_D n_D / (λ_U n_U) in [1, 4/3] for
                n_D desirable and n_U undesirable completions).
            nll_weight: weight of a negative log-likelihood term on each prompt's best responses (RPO; 0 for none);
                for ``kto``, on the desirable completions.
            precompute_ref_logprobs: compute the reference log-probs once when fit starts (needs a DataModule)
                and keep no reference model during training.
            optimizer: built over the policy's parameters once the model exists.
            scheduler: stepped every optimiser step.
            export_dir: where the trained policy and tokenizer are saved (``save_pretrained``) when fit ends.
            gradient_checkpointing: keep only each decoder block's input and recompute the block in backward, for
                the trained policy (``strategies.enable_activation_checkpointing``; the reference keeps no
                activations); about one forward more per step.
            lora: train LoRA adapters (``peft``) on the frozen SFT model; the reference is then the same model with
                the adapter switched off, so no second copy is loaded. The export holds the merged model and, in
                ``export_dir/adapter``, the adapter alone. One device, DDP or FSDP2 (not FSDP1).
        """
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not one of {sorted(LOSS_TYPES)}")
        check_range("beta", beta, "> 0", beta > 0)
        check_range("label_smoothing", label_smoothing, "in [0, 0.5)", 0 <= label_smoothing < 0.5)
        check_range("nll_weight", nll_weight, ">= 0", nll_weight >= 0)
        check_range("simpo_gamma", simpo_gamma, ">= 0", simpo_gamma >= 0)
        check_range("desirable_weight", desirable_weight, "> 0", desirable_weight > 0)
        check_range("undesirable_weight", undesirable_weight, "> 0", undesirable_weight > 0)
        if precompute_ref_logprobs and loss_type == "kto":
            raise ValueError(
                "precompute_ref_logprobs=True: KTO's mismatched rows pair each prompt with another record's "
                "completion, a different one each epoch, so their reference log-probs cannot be cached; leave it False"
            )
        if (precompute_ref_logprobs or ref_model_name_or_path) and loss_type in REFERENCE_FREE:
            given = "precompute_ref_logprobs=True" if precompute_ref_logprobs else "ref_model_name_or_path"
            raise ValueError(f"{given}: loss_type={loss_type!r} uses no reference; leave it unset")
        lora = lora_hparams(lora)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.model: PreTrainedModel | None = None
        self.ref_model: PreTrainedModel | None = None
        self.ref_cache: dict[bytes, float] = {}
        self.shared_prompt_checked = False
        val_names = ["loss", *(KTO_METRICS if loss_type == "kto" else METRICS), *(["nll"] if nll_weight else [])]
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in val_names})
        keep_out_of_checkpoints(self, "ref_model")  # rebuilt from model_name_or_path
        # With LoRA, checkpoints hold the adapters only: the frozen base is rebuilt from model_name_or_path.
        self.checkpoint_trainable_only = lora is not None
        if self.checkpoint_trainable_only:
            keep_frozen_weights_out_of_checkpoints(self)

    def _load_reference(self, meta: bool = False) -> PreTrainedModel:
        hp = self.hparams
        path = hp.ref_model_name_or_path or hp.model_name_or_path
        return load_causal_lm(path, self.tokenizer, hp.dtype, meta=meta).eval().requires_grad_(False)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp, load = self.hparams, Rank0Load(self)
        self.model = load_causal_lm(hp.model_name_or_path, self.tokenizer, hp.dtype, meta=load.meta)
        if hp.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        if hp.lora is not None:
            self.model = apply_lora(self.model, hp.lora)
        disable_dropout(self.model)  # as TRL: policy and reference then score the same tokens alike at step 0
        adapter_off = hp.lora is not None and hp.ref_model_name_or_path is None  # the reference: LoRA switched off
        if not hp.precompute_ref_logprobs and not adapter_off and hp.loss_type not in REFERENCE_FREE:
            self.ref_model = self._load_reference(load.meta)
        fully_shard_models(self, self.model, self.ref_model, load=load)
        check_memory(self, {"policy": self.model, "reference": self.ref_model})

    def train(self, mode: bool = True) -> DPOModule:
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # frozen, whatever the trainer does with the policy
        return self

    # -- reference log-probs ----------------------------------------------------------------------------
    @torch.no_grad()
    def precompute_reference(self, dataloaders) -> None:
        """Fill ``ref_cache`` from a temporary reference model over every batch of ``dataloaders``.

        Every rank computes over the whole data set (no collectives, so no rank waits on another, and later
        epochs may hand any row to any rank); the cost is one no-grad forward per response, once. The temporary
        model is a full copy on each device, even under a sharded strategy.
        """
        ref_model = self._load_reference().to(self.device)
        for dataloader in dataloaders:
            for batch in dataloader:
                batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                self._check_layout(ref_model, batch)
                logps, _ = response_logprobs(ref_model, batch)
                self.ref_cache.update(zip(row_keys(batch), logps.tolist(), strict=True))
        del ref_model

    def _ensure_ref_cache(self) -> None:
        if not self.hparams.precompute_ref_logprobs or self.ref_cache:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RuntimeError("precompute_ref_logprobs=True needs the data as a DataModule passed to the Trainer")
        dataloaders = [datamodule.train_dataloader()]
        if is_overridden("val_dataloader", datamodule):
            dataloaders.append(datamodule.val_dataloader())
        self.precompute_reference(dataloaders)

    def on_fit_start(self) -> None:
        self._ensure_ref_cache()

    def on_validation_start(self) -> None:
        self._ensure_ref_cache()  # trainer.validate alone never calls on_fit_start

    def reference_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """``(n,)`` summed reference log-probs of the batch's responses: live (the frozen copy, or with LoRA the policy
        with its adapter off) or from the cache (looked up on the CPU in ``on_before_batch_transfer``)."""
        if self.hparams.precompute_ref_logprobs:
            return batch["ref_logprobs"]
        reference = self.ref_model if self.ref_model is not None else self.model
        adapter_off = self.model.disable_adapter() if self.ref_model is None else nullcontext()
        with torch.no_grad(), adapter_off:
            logps, _ = response_logprobs(reference, batch)
        return logps

    def cached_reference_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """``(n,)`` float32 cached reference log-probs of a CPU batch's rows."""
        try:
            return torch.tensor([self.ref_cache[key] for key in row_keys(batch)], dtype=torch.float32)
        except KeyError:
            raise KeyError(
                "a response has no precomputed reference log-prob: precompute_ref_logprobs covers the DataModule's "
                "train and validation data only"
            ) from None

    # -- loss -------------------------------------------------------------------------------------------
    def _check_layout(self, model: PreTrainedModel, batch: dict[str, Any]) -> None:
        """At the first shared-prompt batch, refuse a model the layout is not exact for (the reference is built
        like the policy: checking one covers both)."""
        if "logprob_index" in batch and not self.shared_prompt_checked:
            check_shared_prompt_attention(model, batch["input_ids"].device)
            self.shared_prompt_checked = True

    def _step(self, batch: dict[str, Tensor]) -> tuple[Tensor, int, dict[str, Tensor]]:
        """Loss (each prompt with pairs weighing the same), its number of prompts, and per-pair statistics."""
        hp = self.hparams
        if ("desirable" in batch) != (hp.loss_type == "kto"):
            raise ValueError(
                "loss_type='kto' learns from unpaired feedback: give it an UnpairedDataModule"
                if hp.loss_type == "kto"
                else f"loss_type={hp.loss_type!r} learns from pairs: give it a ComparisonDataModule (or use 'kto')"
            )
        if "pair_weights" not in batch and "desirable" not in batch:  # a CPU batch handed over directly
            batch = self.on_before_batch_transfer(dict(batch), 0)
        self._check_layout(self.model, batch)
        if hp.loss_type == "kto":
            return self._kto_step(batch)
        logps, counts = response_logprobs(self.model, batch)
        free = hp.loss_type in REFERENCE_FREE
        policy_scores = logps  # (n,) summed over response tokens
        ref_scores = None if free else self.reference_logprobs(batch)
        if hp.loss_type in LENGTH_NORMALISED:  # IPO, SimPO, ORPO are stated on per-token averaged log-probs
            policy_scores = logps / counts.clamp(min=1)
            ref_scores = None if free else ref_scores / counts.clamp(min=1)
        chosen, rejected = batch["pairs"].unbind(-1)  # (p,) flat rows of the better and the worse response
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_scores[chosen],
            policy_scores[rejected],
            None if free else ref_scores[chosen],
            None if free else ref_scores[rejected],
            hp.beta,
            hp.loss_type,
            hp.label_smoothing,
            simpo_gamma=hp.simpo_gamma,
        )
        loss = (losses * batch["pair_weights"]).sum()

        stats = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": logps[chosen].detach(),
            "logps/rejected": logps[rejected].detach(),
        }
        if hp.nll_weight:
            # RPO (Pang et al. 2024): per-token NLL of each prompt's best responses (better in a pair, worse in
            # none) keeps their likelihood from falling with the rejected ones'.
            best = torch.zeros_like(logps, dtype=torch.bool).index_fill_(0, batch["best"], True)
            nll = mean_token_nll(logps, counts, best)
            loss = loss + hp.nll_weight * nll
            stats["nll"] = nll.detach().expand(len(chosen))
        return loss, batch["n_prompts"], stats

    def _kto_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, int, dict[str, Tensor]]:
        """KTO's loss, a mean over the labelled completions; their number; and statistics (``rewards/margins``: the
        desirable completions' mean implicit reward minus the undesirable ones'; ``kl``: the reference point)."""
        hp = self.hparams
        point = self.mismatched_reference_point(batch["mismatched"])  # first: nothing is held for backward yet
        logps, counts = response_logprobs(self.model, batch)
        ref_logps = self.reference_logprobs(batch)
        good = batch["desirable"].bool()
        losses, rewards = kto_loss(logps, ref_logps, good, point, hp.beta, hp.desirable_weight, hp.undesirable_weight)
        scored = logps.detach()
        stats = {
            "rewards/chosen": rewards[good],
            "rewards/rejected": rewards[~good],
            "kl": point.expand(1),
            "logps/chosen": scored[good],
            "logps/rejected": scored[~good],
        }
        if good.any() and not good.all():
            stats["rewards/margins"] = (rewards[good].mean() - rewards[~good].mean()).expand(1)
        loss = losses.mean()
        if hp.nll_weight:  # RPO's term on the desirable completions
            nll = mean_token_nll(logps, counts, good)
            loss = loss + hp.nll_weight * nll
            stats["nll"] = nll.detach().expand(1)
        return loss, len(losses), stats

    @torch.no_grad()
    def mismatched_reference_point(self, mismatched: dict[str, Tensor]) -> Tensor:
        """KTO's ``z_0`` from the batch's mismatched rows (``UnpairedCollator``), averaged over processes. Policy and
        reference forward them without autograd: ``z_0`` is detached, so no gradient would flow from them, and their
        activations need not be kept for the backward pass (with one completion a prompt, half of a batch's rows)."""
        policy_logps, _ = response_logprobs(self.model, mismatched)
        several = self._trainer is not None and self.trainer.world_size > 1
        reduce = (lambda mean: self.trainer.strategy.reduce(mean, reduce_op="mean")) if several else None
        return kto_reference_point(policy_logps, self.reference_logprobs(mismatched), reduce)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Pair weights, RPO's best rows and any cached reference log-probs, from the batch on the CPU."""
        if self.hparams.precompute_ref_logprobs:
            batch = {**batch, "ref_logprobs": self.cached_reference_logprobs(batch)}
        return batch if "desirable" in batch else {**batch, **pair_layout(batch)}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, n_prompts, stats = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=max(n_prompts, 1))
        for name, values in stats.items():
            if len(values):  # none when the batch has no pair (or, for KTO, no completion of that label)
                self.log(f"train/{name}", values.mean(), batch_size=len(values))
        return loss

    def on_validation_epoch_start(self) -> None:
        # States last reset under trainer.validate's inference mode could not be updated in fit's no-grad mode.
        # In float32: bf16-true casts them with the module.
        reset_float32(self.val_metrics.values())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, n_prompts, stats = self._step(batch)
        # Metric objects: reduced over the whole validation set (and over ranks) at epoch end.
        self.val_metrics["loss"].update(loss, weight=n_prompts)
        for name, values in stats.items():
            if len(values):
                self.val_metrics[name].update(values)
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "rewards/accuracies")

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
