"""PPO against a reward model with a frozen reference (InstructGPT step 3; Ouyang et al. 2022, Ziegler et al. 2019).

Maximised: ``E_{x∼D, y∼π}[r_θ(x, y) − β log(π(y|x) / π_SFT(y|x))] + γ · E_{x∼D_pretrain}[log π(x)]``.

Each ``training_step`` is one PPO iteration on its batch of prompts (manual optimisation):

1. rollout, without gradients (``make_experience``): the policy samples (``rollout_engine``), the policy, value
   function, frozen reference and reward model score (``rl.rollouts``; the models: ``rl.actor_critic``);
2. per-token rewards ``-β · KL_t`` plus the score on the last token; advantages by GAE (or a critic-free estimator:
   ``num_generations`` responses per prompt are a group, each other's baseline), whitened (``rl.experience``);
3. ``ppo_epochs`` passes in ``num_mini_batches`` shuffled minibatches of whole groups, one optimiser step each, on the
   ``objective`` (PPO's clipped surrogate and value loss, or online DPO on each group's best and worst response) and
   PPO-ptx (``rl.updates``): ``trainer.global_step`` counts these;
4. with ``target_kl`` set, β follows Ziegler et al.'s adaptive controller (``losses.adaptive_kl_coef``).

Reference and reward model are frozen: eval mode, no grad, outside the optimiser and out of checkpoints (rebuilt from
their paths). The arguments are checked in ``ppo_options``.
"""

from __future__ import annotations

from dataclasses import fields
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.environments import import_environment
from lightning_rlhf.evaluation.judges import import_reward_fn
from lightning_rlhf.losses.policy import adaptive_kl_coef
from lightning_rlhf.models.causal_lm import keep_out_of_checkpoints
from lightning_rlhf.models.lora import (
    LoraOptions,
    check_fit_setup,
    drop_frozen_weights,
    export_trained,
    keep_frozen_weights_out_of_checkpoints,
    lora_hparams,
)
from lightning_rlhf.modules.ppo_logs import log_rollout, log_samples, val_metrics
from lightning_rlhf.modules.ppo_options import check_last_batch, check_ppo_options, check_rollout_batch
from lightning_rlhf.rl.actor_critic import MODEL_ROLES, ModelOptions, PPOModels, load_ppo_models, policy_outputs
from lightning_rlhf.rl.async_rollouts import AsyncRolloutsLifetime, decoupled
from lightning_rlhf.rl.engines import build_engine
from lightning_rlhf.rl.episodes import EpisodeOptions, episodes_of, sample_episodes
from lightning_rlhf.rl.experience import Experience
from lightning_rlhf.rl.generation import Rollout, check_prompts_fit
from lightning_rlhf.rl.layouts import PaddedRollouts, SharedRollouts
from lightning_rlhf.rl.rollouts import (
    RolloutOptions,
    experience_from,
    sample_rollout,
    seeded,
    sequence_statistics,
    text_scores,
)
from lightning_rlhf.rl.updates import PPOUpdates, ptx_loss
from lightning_rlhf.training.memory import check_memory, ppo_generation
from lightning_rlhf.training.optim import manual_step, optimizer_config, policy_value_groups
from lightning_rlhf.training.strategies import Rank0Load, fully_shard_models, reset_float32

TRAIN_STREAM, VAL_STREAM = 0, 1  # random streams of rollouts for training and for validation


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-6)


class PPOModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        reward_model_name_or_path: str | None = None,
        reward_fn: str | None = None,
        judge_fn: str | None = None,
        ref_model_name_or_path: str | None = None,
        dtype: str = "float32",
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cache_implementation: Literal["dynamic", "static"] = "dynamic",
        compile_generation: bool = False,
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1", "k2", "k3"] = "k1",
        target_kl: float | None = None,
        kl_horizon: int = 10000,
        ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        missing_eos_penalty: float | None = None,
        ptx_coef: float = 0.0,
        max_grad_norm: float | None = 1.0,
        value_lr: float | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        export_dir: str | None = None,
        gradient_checkpointing: bool = False,
        value_head: bool = False,
        log_samples: int = 4,
        seed: int = 0,
        forward_batch_size: int | None = None,
        advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae",
        num_generations: int = 1,
        kl_in_reward: bool = True,
        kl_loss_coef: float = 0.0,
        loss_aggregation: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean",
        objective: Literal["clipped", "dpo"] = "clipped",
        dpo_beta: float = 0.1,
        dpo_loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo"] = "sigmoid",
        dpo_nll_weight: float = 0.0,
        reward_fns: dict[str, float] | None = None,
        lora: LoraOptions | None = None,
        rollout_engine: Literal["hf", "vllm"] = "hf",
        engine_options: dict[str, Any] | None = None,
        engine_is_correction: Literal["none", "token", "sequence"] = "none",
        engine_is_cap: float = 2.0,
        shared_prompt: bool = False,
        rollout_mode: Literal["sync", "async"] = "sync",
        max_staleness: int = 1,
        sync_every: int = 1,
        environment: str | None = None,
        max_turns: int = 4,
        max_episode_tokens: int = 256,
    ):
        """
        Args:
            model_name_or_path: the SFT export (Hugging Face directory or hub name); policy and reference start here.
            reward_model_name_or_path: the reward model export (``RewardModule``); the value model starts here too.
            reward_fn: instead of a reward model, the import path of a function ``(prompt, response) -> float`` on the
                texts as the policy saw them, without special tokens (e.g. ``lightning_rlhf.toy.gold_score``). It runs
                the code it names, as ``class_path`` does: name only code you trust. The value model then starts from
                the SFT export.
            judge_fn: a function like ``reward_fn``, only watched: its mean is logged as ``objective/judge`` beside
                ``objective/scores`` (e.g. a gold judge, to see reward over-optimisation; Gao et al. 2022).
            ref_model_name_or_path: the frozen reference of the KL penalty, if not ``model_name_or_path`` (e.g. the SFT
                model while iterated RLHF continues from the last round's policy); it must share the policy's tokenizer.
            dtype: parameter dtype of all four models, ``float32`` / ``bfloat16`` / ``float16``.
            max_new_tokens: longest response sampled.
            temperature: how responses are sampled (> 0); the log-probs are those of ``softmax(logits / temperature)``.
            top_k, top_p: must stay 0 and 1: the log-probs, KL and ratios are those of the whole tempered distribution
                (arguments only so that a config setting them fails clearly).
            cache_implementation, compile_generation: the hf engine's KV cache, ``dynamic`` or ``static``, and whether
                to ``torch.compile`` its decode step (static cache only; docs/performance.md). Same distribution.
            kl_coef: β, the weight of the per-token KL penalty to the reference (the initial β when adaptive).
            kl_estimator: ``k1`` (the log-ratio InstructGPT uses), ``k2`` or ``k3`` (see ``losses.kl_penalty``).
            target_kl: KL per sequence that the adaptive controller steers towards; ``None`` keeps β fixed.
            kl_horizon: the controller's horizon in sequences.
            ppo_epochs: passes over each rollout batch.
            num_mini_batches: minibatches (optimiser steps) per pass.
            clip_range: ε of the clipped surrogate.
            clip_range_value: how far a value may move from its rollout estimate before its loss is clipped.
            vf_coef: weight of the value loss.
            gamma, lam: GAE's discount and λ.
            whiten_advantages: normalise advantages over the batch's response tokens.
            missing_eos_penalty: subtracted from the score of a response without EOS (as TRL's); ``None`` for none.
            ptx_coef: γ, the weight of the language-model loss on pretraining text (PPO-ptx; ``pretrain_path``).
            max_grad_norm: clip the gradient norm of the policy and, apart (its gradient is often tens of times the
                policy's), of the value function to this; ``None``: no clipping (the Trainer's ``gradient_clip_val``
                does not apply to manual optimisation). A ``value_head``'s backbone is clipped as the policy.
            value_lr: learning rate of the value function (its own parameter group); ``None``: the optimiser's.
            optimizer: built over two parameter groups, the policy's and the value function's trainable parameters.
            scheduler: stepped every optimiser step.
            export_dir: where the trained policy and tokenizer are saved (``save_pretrained``) when fit ends.
            gradient_checkpointing: recompute each decoder block of policy and value model in backward
                (``strategies.enable_activation_checkpointing``): about one forward more per minibatch.
            value_head: the value function is a linear head on the policy's last hidden state (from the reward model's
                head; one model and one forward fewer), not a network initialised from the whole reward model.
            log_samples: prompts, responses and scores of the first rollout of each epoch and of the first validation
                batch logged as TensorBoard text (``train/samples``, ``val/samples``); 0 for none.
            seed: rollout ``i`` on rank ``k`` samples and shuffles from a generator seeded by ``(seed, i, k)``: a
                resumed run draws what the uninterrupted one drew, and every validation the same samples.
            forward_batch_size: rows per scoring forward of a rollout, bounding the activations and logits held at once
                (16 rows × 128 tokens of float32 logits at a 128k vocabulary are 1 GiB); ``None``: the whole batch.
            advantage_estimator: ``gae`` (PPO with a value function), or critic-free: ``grpo`` (reward minus its
                group's mean, over the group's std), ``dr_grpo`` (minus the mean only), ``rloo`` (minus the mean of
                the others), ``reinforce_pp`` (discounted returns of the per-token rewards, whitened over the batch).
            num_generations: G, responses sampled per prompt in one rollout, kept together through minibatching (the
                group estimators need G >= 2); a batch of n prompts gives n · G sequences.
            kl_in_reward: put ``-β · KL`` into the reward (InstructGPT); ``False`` leaves it out (β unused there).
            kl_loss_coef: weight of GRPO's k3 KL loss term on the policy, aggregated as its loss (Shao et al. 2024).
            loss_aggregation: how per-token losses make one: ``token_mean`` (every token alike), ``seq_mean_token_sum``
                (Dr. GRPO: each response's sum over ``max_new_tokens``), ``seq_mean_token_mean`` (every response alike).
            objective: each minibatch's loss (``updates.OBJECTIVES``): ``clipped`` (PPO's surrogate on the advantages
                above), or ``dpo``: online DPO, each prompt's best- and worst-scored of its ``num_generations``
                responses a pair (none where all score alike); no value function. ``dpo_beta``, ``dpo_loss_type``: its
                β and ``losses.dpo_loss`` type, against the reference; ``dpo_nll_weight``: RPO's NLL term on the chosen.
            reward_fns: ``{import path: weight}``: the reward is the weighted sum; each function's mean is logged as
                ``objective/reward/<function name>``.
            lora: train LoRA adapters (``peft``) instead of every weight; the reference is then the policy with its
                adapter off, unless ``ref_model_name_or_path`` names another. A value model gets adapters of its own;
                heads train in full. Checkpoints hold the trainable parameters; the export the merged policy and, in
                ``export_dir/adapter``, the adapter. One device, DDP or FSDP2 (not FSDP1); docs/lora.md.
            rollout_engine: ``hf`` (``generate`` on the policy) or ``vllm`` (a colocated engine synced before every
                rollout; its log-probs logged against the policy's, ``train/rollout/logprob_diff_mean``, ``_max``).
            engine_options: the engine's settings, e.g. ``{gpu_memory_utilization: 0.3, sleep: true}`` (``engines``).
            engine_is_correction, engine_is_cap: weight each token's policy loss by a truncated importance ratio of the
                policy to the engine, per ``token`` or ``sequence`` (``losses.engine_importance_weights``); ``none``.
            shared_prompt: forward the rows of a prompt (the G responses of GRPO / RLOO) as one row, the prompt once
                (``layouts.SharedRollouts``): the same outputs for fewer tokens; a model it is not exact for is refused.
            rollout_mode, max_staleness, sync_every: ``sync``: each step samples its own rollout; ``async``: a worker
                process samples the next ``max_staleness`` while the trainer trains, none used more than that many
                policy versions old, its weights sent every ``sync_every`` updates; the loss is AReaL's decoupled one
                at ``engine_is_correction``'s level (``none``: ``token``) and cap (``rl.async_rollouts``).
            environment, max_turns, max_episode_tokens: instead of a reward model, an environment class's import path
                (``environments``, e.g. ``lightning_rlhf.toy.ToolEnv``; it runs the code it names): each prompt starts
                episodes of at most ``max_turns`` turns (``max_new_tokens`` each) and ``max_episode_tokens`` tokens
                after the prompt, scored by their reward, trained on the policy's tokens only (``rl.episodes``).
        """
        super().__init__()
        lora = lora_hparams(lora)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        check_ppo_options(self.hparams)
        # name -> (function, weight); reward_fn is one function of weight 1
        weighted = reward_fns or ({reward_fn: 1.0} if reward_fn is not None else {})
        self.reward_fns = {path.rpartition(".")[2]: (import_reward_fn(path), float(w)) for path, w in weighted.items()}
        self.judge_fn = import_reward_fn(judge_fn) if judge_fn is not None else None
        self.environment = import_environment(environment) if environment is not None else None
        self.episode_options = EpisodeOptions(**{f.name: self.hparams[f.name] for f in fields(EpisodeOptions)})
        self.automatic_optimization = False
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.rollout_options = RolloutOptions.of(self.hparams)  # how rollouts are sampled and scored
        self.updates = PPOUpdates.of(self.hparams)  # the loss and the minibatches of each rollout's updates
        self.tokenizer = load_tokenizer(model_name_or_path)
        # Built in configure_model (``actor_critic.PPOModels``); a value model or head only with ``gae``.
        self.model = self.value_model = self.value_head = self.ref_model = self.reward_model = None
        # How the forwards over a rollout's rows lay them out: padded rows, or each prompt once (``shared_rollout``).
        self.rollout_layout = SharedRollouts(self.tokenizer.pad_token_id) if shared_prompt else PaddedRollouts()
        self.kl_coef = float(kl_coef)  # β; saved in checkpoints (on_save_checkpoint) since it adapts
        self.rollouts = 0  # training rollouts so far, saved in checkpoints: it seeds the next one
        self.engine = None  # built at the first rollout, from the policy's export
        self.async_rollouts = None  # async: the worker and its staleness bound, from on_train_start to fit's end
        if rollout_mode == "async":  # the engine correction moves from the advantages into the updates' loss
            self.rollout_options, self.updates = decoupled(self.rollout_options, self.updates, self.hparams)
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in val_metrics(judge_fn, environment)})
        keep_out_of_checkpoints(self, "ref_model", "reward_model")  # rebuilt from their paths
        if lora is not None:  # the frozen bases too
            keep_frozen_weights_out_of_checkpoints(self)

    # -- models -----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        load = Rank0Load(self)
        models = load_ppo_models(self.tokenizer, ModelOptions.of(self.hparams), meta=load.meta)
        # Registered in this order (the state dict's): policy, reference, reward model, value function.
        self.model, self.ref_model, self.reward_model = models.policy, models.ref_model, models.reward_model
        self.value_head, self.value_model = models.value_head, models.value_model
        fully_shard_models(self, *models, load=load)
        check_memory(self, dict(zip(MODEL_ROLES, models, strict=True)), ppo_generation(self))

    def train(self, mode: bool = True) -> PPOModule:
        super().train(mode)
        for frozen in (self.ref_model, self.reward_model):
            if frozen is not None:
                frozen.eval()  # whatever the trainer does with the policy
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kl_coef"], checkpoint["rollouts"] = self.kl_coef, self.rollouts
        if self.hparams.lora is not None:
            drop_frozen_weights(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.kl_coef = checkpoint.get("kl_coef", self.kl_coef)
        self.rollouts = checkpoint.get("rollouts", self.rollouts)

    def seeded(self, stream: int, index: int):
        """Random numbers (sampling, shuffling) drawn as ``rollouts.seeded`` of ``(seed, stream, index, rank)``."""
        rank = self.global_rank if self._trainer is not None else 0
        return seeded((self.hparams.seed, stream, index, rank), self.device)

    # -- rollouts ---------------------------------------------------------------------------------------
    def response_logprobs(self, model: PreTrainedModel, sequences: Tensor, attention_mask: Tensor, start: int):
        """``(b, r)`` log-prob of each response token (columns ``start:``) under ``model``'s tempered distribution."""
        return self.rollout_layout.logprobs(model, sequences, attention_mask, start, self.hparams.temperature)

    def reference_logprobs(self, sequences: Tensor, attention_mask: Tensor, start: int) -> Tensor:
        """``(b, r)`` reference log-probs of the response tokens: the frozen copy's, or with LoRA the policy's with its
        adapter switched off (the base weights, bit for bit)."""
        if self.ref_model is not None:
            return self.response_logprobs(self.ref_model, sequences, attention_mask, start)
        with self.model.disable_adapter():
            return self.response_logprobs(self.model, sequences, attention_mask, start)

    def policy_outputs(self, sequences: Tensor, attention_mask: Tensor, start: int) -> tuple[Tensor, Tensor | None]:
        """``(b, r)`` policy log-probs of the response tokens and values before them (``actor_critic``)."""
        models = PPOModels(self.model, self.value_model, self.value_head, self.ref_model, self.reward_model)
        return policy_outputs(models, self.rollout_layout, self.hparams.temperature, sequences, attention_mask, start)

    @torch.no_grad()
    def make_experience(self, batch: dict[str, Tensor]) -> Experience:
        """Sample ``num_generations`` responses per prompt of ``batch`` (``rollouts.sample_rollout``) and score them
        (``score_rollout``)."""
        hp = self.hparams
        length = hp.max_episode_tokens if self.environment is not None else hp.max_new_tokens
        check_prompts_fit(self.model, batch["input_ids"].shape[1], length)
        if self.engine is None:
            self.engine = build_engine(hp.rollout_engine, hp.model_name_or_path, hp.dtype, hp.engine_options)
        sharded, models = self.device_mesh is not None and self.device_mesh.size() > 1, (self.model, self.tokenizer)
        if self.environment is None:
            rollout = sample_rollout(self.engine, *models, batch, self.rollout_options, sharded)
        else:  # G episodes of each prompt, in consecutive rows
            envs, records = episodes_of(self.environment, batch["records"], hp.num_generations)
            rollout = sample_episodes(self.engine, *models, envs, records, self.episode_options, sharded)
        return self.score_rollout(rollout)

    @torch.no_grad()
    def score_rollout(self, rollout: Rollout) -> Experience:
        """Policy and reference log-probs, values and scores of sampled responses, made into PPO experience
        (``rollouts.experience_from``)."""
        rewards = partial(self.rollout_layout.rewards, self.reward_model) if self.reward_model is not None else None
        forwards = (self.policy_outputs, self.reference_logprobs, rewards)
        return experience_from(rollout, forwards, self.reward_fns, self.tokenizer, self.kl_coef, self.rollout_options)

    def judge_scores(self, experience: Experience) -> Tensor | None:
        """``(b,)`` the ``judge_fn``'s scores (``None`` without one; an episode's reward without one)."""
        if self.judge_fn is None and experience.rollout.episodes is not None:
            return experience.rollout.episodes.rewards
        judge = {"judge": self.judge_fn} if self.judge_fn is not None else {}
        return text_scores(judge, self.tokenizer, experience.rollout).get("judge")

    # -- PPO --------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        hp = self.hparams
        check_rollout_batch(batch, hp.ptx_coef, hp.num_mini_batches)
        if self.async_rollouts is not None:  # this batch's rollout asked for; the oldest fresh one in flight taken
            key, self.rollouts = (hp.seed, TRAIN_STREAM, self.rollouts, self.global_rank), self.rollouts + 1  # seeded's
            if (taken := self.async_rollouts.step(key, batch, self.model)) is None:
                return  # the pipeline fills
            rollout, orders, batch = taken
            self.log_dict(self.async_rollouts.statistics())
            experience = self.score_rollout(rollout)
        else:
            with self.seeded(TRAIN_STREAM, self.rollouts):
                experience = self.make_experience(batch)
                n_groups = len(experience.scores) // hp.num_generations
                orders = [torch.randperm(n_groups).to(self.device) for _ in range(hp.ppo_epochs)]
            self.rollouts += 1
        rollout_stats = log_rollout(self, experience, self.judge_scores(experience))
        if batch_idx == 0:  # the first rollout of every epoch
            log_samples(self, "train/samples", experience)
        self.log("train/kl_coef", self.kl_coef)
        ptx = partial(ptx_loss, self.model, batch, group_size=hp.num_generations) if hp.ptx_coef else None
        for name, value in self.updates.run(
            experience, orders, self.policy_outputs, partial(manual_step, self), ptx
        ).items():
            self.log(f"train/{name}", value, sync_dist=True)
        if hp.target_kl is not None:  # every rank the same β (``reduce`` works in place: on a copy)
            kl = self.trainer.strategy.reduce(rollout_stats["objective/kl"].clone(), reduce_op="mean")
            sequences = len(experience.scores) * self.trainer.world_size
            self.kl_coef = adaptive_kl_coef(self.kl_coef, float(kl), hp.target_kl, sequences, hp.kl_horizon)
        if self.async_rollouts is not None:
            self.async_rollouts.updated(self.model)  # a new policy version

    # -- validation -------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # States last reset under trainer.validate's inference mode could not be updated in fit's no-grad mode.
        # In float32: bf16-true casts them with the module.
        reset_float32(self.val_metrics.values())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with self.seeded(VAL_STREAM, batch_idx):
            experience = self.make_experience(batch)
        values = sequence_statistics(experience, self.kl_coef, self.judge_scores(experience))  # (b,) each
        for name, metric in self.val_metrics.items():
            metric.update(values[name])
            self.log(f"val/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "objective/scores")
        if batch_idx == 0:
            log_samples(self, "val/samples", experience)

    # -- optimisation and export ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        value = self.value_head if self.value_head is not None else self.value_model
        groups = policy_value_groups(self.model, value, self.hparams.value_lr)
        return optimizer_config(groups, self.optimizer_factory, self.scheduler_factory)

    def setup(self, stage: str) -> None:
        check_fit_setup(self, stage)

    def on_train_start(self) -> None:
        check_last_batch(self.trainer.train_dataloader, self.hparams.num_mini_batches)

    def configure_callbacks(self) -> list[Callback]:
        return [AsyncRolloutsLifetime()] if self.hparams.rollout_mode == "async" else []  # starts and ends the worker

    def on_train_end(self) -> None:
        export_trained(self)
