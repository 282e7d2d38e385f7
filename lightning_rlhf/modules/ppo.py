"""PPO against a reward model with a frozen reference (InstructGPT step 3; Ouyang et al. 2022, Ziegler et al. 2019).

Maximised: ``E_{x∼D, y∼π}[r_θ(x, y) − β log(π(y|x) / π_SFT(y|x))] + γ · E_{x∼D_pretrain}[log π(x)]``.

Each ``training_step`` is one PPO iteration on its batch of prompts:

1. rollout, without gradients (``make_experience``): the policy samples one response per prompt (``rollout_engine``:
   KV-cached ``generate``, or a colocated vLLM engine synced from the policy first); then, for every response token
   ``t``, the policy's and the reference's log-probs, the value ``V_t`` of the state before the token (value model),
   and the reward model's score of the whole sequence;
2. per-token rewards ``-β · KL_t`` plus the score on the last token (``losses.ppo_rewards``); advantages by GAE,
   whitened over the batch's response tokens; returns ``A + V``;
3. ``ppo_epochs`` passes over the batch in ``num_mini_batches`` shuffled minibatches, one optimiser step each:
   clipped surrogate + ``vf_coef`` · clipped value loss (+ ``ptx_coef`` · language-model loss on the minibatch's
   pretraining text, PPO-ptx). Manual optimisation, so ``trainer.global_step`` counts these steps:
   ``max_steps = rollouts · ppo_epochs · num_mini_batches``;
4. with ``target_kl`` set, β follows Ziegler et al.'s adaptive controller (``losses.adaptive_kl_coef``).

Critic-free (``advantage_estimator``: ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``): no value function is built,
trained or checkpointed; ``num_generations`` responses per prompt form a group whose rewards give each other's
baseline (``rollout.build_experience`` is where every estimator's advantage is computed), minibatches keep groups
whole, and the KL can move from the reward (``kl_in_reward``) to a k3 loss term on the policy (``kl_loss_coef``).

Log-probs of policy and reference are taken under ``softmax(logits / temperature)``: the distribution sampled.
The value model is its own network initialised from the reward model (its backbone and head, read at every
position), or with ``value_head`` a linear head on the policy's last hidden state. Reference and reward model are
frozen: eval mode, no grad, outside the optimiser and out of checkpoints (rebuilt from their paths). Dropout is off
in policy and value model, so repeated forwards agree and the first minibatch's probability ratio is exactly 1.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.evaluation.judges import import_reward_fn
from lightning_rlhf.losses.policy import (
    KL_ESTIMATORS,
    adaptive_kl_coef,
    aggregate_loss,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
)
from lightning_rlhf.losses.tokens import masked_mean
from lightning_rlhf.models.causal_lm import (
    disable_dropout,
    forward_logits,
    keep_out_of_checkpoints,
    load_causal_lm,
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
    unwrap,
)
from lightning_rlhf.models.reward import load_reward_model, reward_head
from lightning_rlhf.rl.engines import build_engine, check_engine_options
from lightning_rlhf.rl.experience import (
    Experience,
    build_experience,
    check_critic_free_args,
    correct_for_engine,
    engine_mismatch,
    group_minibatches,
    group_statistics,
)
from lightning_rlhf.rl.generation import (
    Rollout,
    check_generation_options,
    check_prompts_fit,
    check_sampling_options,
    decode_responses,
)
from lightning_rlhf.rl.layouts import PaddedRollouts, SharedRollouts
from lightning_rlhf.training.memory import check_memory, ppo_generation
from lightning_rlhf.training.optim import clip_grad_norms, optimizer_config, trainable
from lightning_rlhf.training.strategies import (
    Rank0Load,
    enable_activation_checkpointing,
    fully_shard_models,
    reset_float32,
)
from lightning_rlhf.validation import check_range

TRAIN_STREAM, VAL_STREAM = 0, 1  # random streams of rollouts for training and for validation
VAL_METRICS = ("objective/scores", "objective/kl", "objective/rlhf_reward", "response_length")


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
        reward_fns: dict[str, float] | None = None,
        lora: LoraOptions | None = None,
        rollout_engine: Literal["hf", "vllm"] = "hf",
        engine_options: dict[str, Any] | None = None,
        engine_is_correction: Literal["none", "token", "sequence"] = "none",
        engine_is_cap: float = 2.0,
        shared_prompt: bool = False,
    ):
        """
        Args:
            model_name_or_path: the SFT export (Hugging Face directory or hub name); policy and reference start here.
            reward_model_name_or_path: the reward model export (``RewardModule``); the value model starts here too.
            reward_fn: instead of a reward model, the import path of a function ``(prompt, response) -> float`` on
                text (e.g. ``lightning_rlhf.toy.gold_score``, a rule, a verifier); the prompt is as the policy saw it
                (chat template rendered), both without special tokens. It imports and runs the code it names, as
                ``class_path`` does: name only code you trust. The value model then starts from the SFT
                export with a fresh head (or, with ``value_head``, a zero head).
            judge_fn: the import path of a function ``(prompt, response) -> float`` (run like ``reward_fn``) that is
                only watched, never optimised: its mean over each rollout and over validation is logged as
                ``objective/judge`` beside the reward model's ``objective/scores`` (e.g. a gold judge, to see reward
                over-optimisation: the reward model's score rising while the judge's falls; Gao et al. 2022).
            ref_model_name_or_path: the frozen reference of the KL penalty, when it is not the policy's starting
                point (``None``: ``model_name_or_path``); e.g. iterated RLHF continues from the last round's policy and
                keeps the SFT model as reference. It must share the policy's tokenizer.
            dtype: parameter dtype of all four models, ``float32`` / ``bfloat16`` / ``float16``.
            max_new_tokens: longest response sampled.
            temperature: how responses are sampled (> 0); the log-probs are those of ``softmax(logits / temperature)``.
            top_k, top_p: must stay 0 and 1: a truncated distribution is not the one the log-probs, the KL and the
                probability ratios are computed under (kept as arguments so that a config setting them fails clearly).
            cache_implementation, compile_generation: the hf engine's KV cache, ``dynamic`` or ``static`` (preallocated;
                ``rollout.generate``), and whether to ``torch.compile`` its decode step (needs the static cache; no gain
                at the embedded default's size on a CPU: README, Performance). Both sample the same distribution.
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
            missing_eos_penalty: subtracted from the score of a response that did not end with EOS within
                ``max_new_tokens`` (TRL's flag of the same name); ``None`` for none.
            ptx_coef: γ, the weight of the language-model loss on pretraining text (PPO-ptx); needs
                ``PromptDataModule(pretrain_path=…)``.
            max_grad_norm: clip the gradient norm of the policy and, separately, of the value function to this
                (``None`` for no clipping; the Trainer's ``gradient_clip_val`` does not apply to manual optimisation).
                Separately, because the value error's gradient is often tens of times the policy's: one global norm
                would shrink every policy step by a factor that changes with the value error. With ``value_head``
                the policy's backbone carries both gradients and is clipped as the policy.
            value_lr: learning rate of the value function (its own parameter group); ``None``: the optimiser's.
            optimizer: built over two parameter groups, the policy's and the value function's trainable parameters,
                once they exist.
            scheduler: stepped every optimiser step.
            export_dir: where the trained policy and tokenizer are saved (``save_pretrained``) when fit ends.
            gradient_checkpointing: keep only each decoder block's input and recompute the block in backward, for
                the trained models, policy and value model (``strategies.enable_activation_checkpointing``);
                about one forward more per minibatch. Rollouts run without gradients and are unaffected.
            value_head: the value function is a linear head on the policy's last hidden state (one model fewer in
                memory, one forward fewer per step; initialised from the reward model's head), instead of a separate
                network initialised from the whole reward model.
            log_samples: how many prompts, responses and scores of the first rollout of each epoch and of the first
                validation batch are logged as TensorBoard text (``train/samples``, ``val/samples``); 0 for none.
            seed: rollout ``i`` on rank ``k`` samples (and shuffles its minibatches) from a generator seeded by
                ``(seed, i, k)``, so a run resumed from a checkpoint draws exactly what the uninterrupted run drew,
                and every validation draws the same samples for the same prompts.
            forward_batch_size: rows per scoring forward of a rollout (policy, value, reference and reward model);
                ``None``: the whole rollout batch at once. Bounds the activations and logits held at once (at a 128k
                vocabulary, 16 rows × 128 response tokens of float32 logits are 1 GiB).
            advantage_estimator: ``gae`` (PPO with a value function), or critic-free: ``grpo`` (reward minus its
                group's mean, over the group's std), ``dr_grpo`` (minus the mean only), ``rloo`` (minus the mean of
                the group's other responses), ``reinforce_pp`` (discounted returns of the per-token rewards, whitened
                over the batch); see ``losses.group_advantages`` and ``losses.reinforce_pp_advantages``.
            num_generations: G, responses sampled per prompt in one rollout, kept together through minibatching (the
                group estimators need G >= 2); a batch of n prompts gives n · G sequences.
            kl_in_reward: put ``-β · KL`` into the reward (InstructGPT); ``False`` leaves it out (β unused there).
            kl_loss_coef: weight of GRPO's KL loss term on the policy, k3 of policy to reference per token, aggregated
                like the policy loss (Shao et al. 2024); 0 for none.
            loss_aggregation: how per-token losses make one: ``token_mean`` (every token of the minibatch alike),
                ``seq_mean_token_sum`` (Dr. GRPO: each response's sum over ``max_new_tokens``),
                ``seq_mean_token_mean`` (every response alike); see ``losses.aggregate_loss``.
            reward_fns: several reward functions, ``{import path: weight}``: the reward is the weighted sum, and each
                function's mean is logged as ``objective/reward/<function name>`` (e.g. format and correctness).
            lora: train LoRA adapters (``peft``) on the frozen policy instead of every weight. The reference is then
                the policy with its adapter switched off (no second copy), unless ``ref_model_name_or_path`` names
                another model, which is loaded as before. A value model gets adapters of its own (same options) and
                its head trains in full; a ``value_head`` trains in full on the adapted policy. Checkpoints hold only
                the trainable parameters; the export holds the merged policy and, in ``export_dir/adapter``, the
                adapter alone. One device, DDP or FSDP2 (not FSDP1).
            rollout_engine: ``hf`` (``generate`` on the policy) or ``vllm`` (a colocated vLLM engine per process, synced
                from the policy before every rollout; its log-probs of the sampled tokens are logged against the
                policy's, ``train/rollout/logprob_diff_mean`` and ``_max``); see ``engines``.
            engine_options: the engine's settings, e.g. ``{gpu_memory_utilization: 0.3, sleep: true}`` (``engines``).
            engine_is_correction, engine_is_cap: weight each token's policy loss by a truncated importance ratio of the
                policy to the engine, per ``token`` or ``sequence`` (``losses.engine_importance_weights``); ``none``.
            shared_prompt: forward consecutive rollout rows with the same prompt (the G responses of GRPO / RLOO) as
                one row, the prompt once (``shared_rollout``): the padded rows' log-probs, values and rewards, for
                fewer tokens. Each model is checked at its first use; one the layout is not exact for is refused.
        """
        super().__init__()
        sources = [reward_model_name_or_path, reward_fn, reward_fns]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("give PPOModule exactly one of reward_model_name_or_path, reward_fn and reward_fns")
        check_critic_free_args(advantage_estimator, num_generations, loss_aggregation, value_head)
        # name -> (function, weight); reward_fn is one function of weight 1
        weighted = reward_fns or ({reward_fn: 1.0} if reward_fn is not None else {})
        self.reward_fns = {path.rpartition(".")[2]: (import_reward_fn(path), float(w)) for path, w in weighted.items()}
        self.judge_fn = import_reward_fn(judge_fn) if judge_fn is not None else None
        check_sampling_options(temperature, top_k, top_p)
        check_range("max_new_tokens", max_new_tokens, ">= 1", max_new_tokens >= 1)
        check_generation_options(cache_implementation, compile_generation)
        check_engine_options(rollout_engine, engine_is_correction, engine_is_cap)
        check_range("kl_coef", kl_coef, ">= 0", kl_coef >= 0)
        check_range("clip_range", clip_range, "> 0", clip_range > 0)
        check_range("clip_range_value", clip_range_value, "> 0", clip_range_value > 0)
        check_range("vf_coef", vf_coef, ">= 0", vf_coef >= 0)
        check_range("gamma", gamma, "in [0, 1]", 0 <= gamma <= 1)
        check_range("lam", lam, "in [0, 1]", 0 <= lam <= 1)
        check_range("ptx_coef", ptx_coef, ">= 0", ptx_coef >= 0)
        check_range("max_grad_norm", max_grad_norm, "> 0 or None", max_grad_norm is None or max_grad_norm > 0)
        check_range("kl_horizon", kl_horizon, ">= 1", kl_horizon >= 1)
        check_range("log_samples", log_samples, ">= 0", log_samples >= 0)
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={kl_estimator!r} is not one of {sorted(KL_ESTIMATORS)}")
        check_range("target_kl", target_kl, "> 0 (or None for a fixed kl_coef)", target_kl is None or target_kl > 0)
        check_range(
            "forward_batch_size",
            forward_batch_size,
            ">= 1 (or None for the whole batch)",
            forward_batch_size is None or forward_batch_size >= 1,
        )
        check_range("ppo_epochs", ppo_epochs, ">= 1", ppo_epochs >= 1)
        check_range("num_mini_batches", num_mini_batches, ">= 1", num_mini_batches >= 1)
        lora = lora_hparams(lora)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.model: PreTrainedModel | None = None
        self.value_model: PreTrainedModel | None = None
        self.value_head: nn.Linear | None = None
        self.ref_model: PreTrainedModel | None = None
        self.reward_model: PreTrainedModel | None = None
        # How the forwards over a rollout's rows lay them out: padded rows, or each prompt once (``shared_rollout``).
        self.rollout_layout = SharedRollouts(self.tokenizer.pad_token_id) if shared_prompt else PaddedRollouts()
        self.kl_coef = float(kl_coef)  # β; saved in checkpoints (on_save_checkpoint) since it adapts
        self.rollouts = 0  # training rollouts so far, saved in checkpoints: it seeds the next one
        self.engine = None  # built at the first rollout, from the policy's export
        watched = VAL_METRICS + (("objective/judge",) if judge_fn is not None else ())
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in watched})
        keep_out_of_checkpoints(self, "ref_model", "reward_model")  # rebuilt from their paths
        if lora is not None:  # the frozen bases too
            keep_frozen_weights_out_of_checkpoints(self)

    # -- models -----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp, load = self.hparams, Rank0Load(self)
        self.model = load_causal_lm(hp.model_name_or_path, self.tokenizer, hp.dtype, meta=load.meta)
        reference = hp.ref_model_name_or_path or hp.model_name_or_path
        self._check_tokenizer(reference, "reference model")
        if hp.lora is not None:
            self.model = apply_lora(self.model, hp.lora)
        if hp.lora is None or reference != hp.model_name_or_path:  # else: the policy with its adapter off
            self.ref_model = load_causal_lm(reference, self.tokenizer, hp.dtype, meta=load.meta)
            self.ref_model.eval().requires_grad_(False)
        if hp.reward_model_name_or_path is not None:
            self._check_tokenizer(hp.reward_model_name_or_path, "reward model")
            rewards = load_reward_model(hp.reward_model_name_or_path, self.tokenizer, hp.dtype, meta=load.meta)
            self.reward_model = rewards.eval().requires_grad_(False)
        value_start = hp.reward_model_name_or_path or hp.model_name_or_path  # an SFT export gets a fresh head
        critic = hp.advantage_estimator == "gae"  # the critic-free estimators build no value function at all
        if critic and hp.value_head:
            self.value_head = self._value_head_from(reward_head(self.reward_model) if self.reward_model else None)
        elif critic:
            self.value_model = load_reward_model(value_start, self.tokenizer, hp.dtype, meta=load.meta)
            if hp.lora is not None:
                self.value_model = apply_lora(self.value_model, hp.lora, task_type="SEQ_CLS")
        for trained in (self.model, self.value_model):
            if trained is not None:
                disable_dropout(trained)
                if hp.gradient_checkpointing:
                    enable_activation_checkpointing(trained)
        models = (self.model, self.value_model, self.value_head, self.ref_model, self.reward_model)
        fully_shard_models(self, *models, load=load)
        names = ("policy", "value model", "value head", "reference", "reward model")
        check_memory(self, dict(zip(names, models, strict=True)), ppo_generation(self))

    def _check_tokenizer(self, path: str, role: str) -> None:
        """The other model must read every policy token id as the policy does: the same vocabulary, or a superset
        of it (a reward model trained with ``reward_token`` has that one token more)."""
        if path == self.hparams.model_name_or_path:
            return
        theirs = load_tokenizer(path).get_vocab()
        if any(theirs.get(token) != index for token, index in self.tokenizer.get_vocab().items()):
            raise ValueError(
                f"the {role} {path} and the policy {self.hparams.model_name_or_path} use different tokenizers: "
                "token ids only mean the same to both when its vocabulary holds the policy's, id for id (train it "
                "from the same SFT export)"
            )

    def _value_head_from(self, reward_head: nn.Linear | None) -> nn.Linear:
        """A value head on the policy's hidden states: the reward model's head when there is one of the same width,
        else zeros, with a bias (from 0) for the mean return."""
        width = self.model.config.hidden_size
        head = nn.Linear(width, 1, dtype=self.model.dtype, device=self.model.device)  # meta under Rank0Load
        with torch.no_grad():
            head.bias.zero_()
            head.weight.zero_()
            if reward_head is not None and reward_head.weight.shape == head.weight.shape:
                head.weight.copy_(reward_head.weight)
            elif reward_head is not None:
                rank_zero_info(
                    f"value head: the reward model is {reward_head.in_features} wide, the policy {width}; "
                    "starting from zeros"
                )
        return head

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

    @contextmanager
    def seeded(self, stream: int, index: int):
        """Draw random numbers (sampling, shuffling) from a generator seeded by ``(seed, stream, index, rank)``,
        leaving the global random state as it was."""
        rank = self.global_rank if self._trainer is not None else 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(hash((self.hparams.seed, stream, index, rank)) % 2**63)
            yield

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

    def policy_outputs(self, sequences: Tensor, attention_mask: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """``(b, r)`` policy log-probs of the response tokens and values of the states before them (the value at the
        column before each token, like the logits that predict it); values ``None`` without a value function."""
        if self.value_head is None and self.value_model is None:
            return self.response_logprobs(self.model, sequences, attention_mask, start), None
        if self.value_head is None:
            logprobs = self.response_logprobs(self.model, sequences, attention_mask, start)
            return logprobs, self.rollout_layout.values(self.value_model, sequences, attention_mask, start)
        # The backbone's output, caught on its way to the LM head (``output_hidden_states`` comes back empty when
        # FSDP2 has swapped the layers' classes).
        caught: list[Tensor] = []
        hook = unwrap(self.model).base_model.register_forward_hook(lambda module, args, out: caught.append(out[0]))
        try:
            logprobs = self.response_logprobs(self.model, sequences, attention_mask, start)
        finally:
            hook.remove()
        states = self.rollout_layout.columns(caught[-1], sequences, attention_mask, start)
        values = self.value_head(states).squeeze(-1).float()
        return logprobs, values

    @torch.no_grad()
    def make_experience(self, batch: dict[str, Tensor]) -> Experience:
        """Sample ``num_generations`` responses per left-padded prompt of ``batch`` (a prompt's in consecutive rows)
        and score them (``score_rollout``)."""
        hp = self.hparams
        input_ids, attention_mask = (
            batch[k].repeat_interleave(hp.num_generations, 0) for k in ("input_ids", "attention_mask")
        )
        check_prompts_fit(self.model, batch["input_ids"].shape[1], hp.max_new_tokens)
        if self.engine is None:
            self.engine = build_engine(hp.rollout_engine, hp.model_name_or_path, hp.dtype, hp.engine_options)
        self.engine.sync(self.model)  # never sample from stale weights
        # Sharded ranks must keep stepping together (their forwards gather weights) until all have finished.
        sharded = self.device_mesh is not None and self.device_mesh.size() > 1
        rollout = self.engine.generate(
            self.model,
            self.tokenizer,
            input_ids,
            attention_mask,
            hp.max_new_tokens,
            hp.temperature,
            synced_gpus=sharded,
            cache_implementation=hp.cache_implementation,
            compile=hp.compile_generation,
        )
        return self.score_rollout(rollout)

    @torch.no_grad()
    def score_rollout(self, rollout: Rollout) -> Experience:
        """Policy and reference log-probs, values and scores of sampled responses, made into PPO experience.

        The forwards run ``forward_batch_size`` rows at a time (every rank the same number of forwards, as sharded
        models need, when ranks hold rollouts of the same size).
        """
        hp = self.hparams
        sequences, attention_mask, start = rollout.sequences, rollout.attention_mask, rollout.prompt_length
        parts = []
        for rows in torch.arange(len(sequences), device=sequences.device).split(
            hp.forward_batch_size or len(sequences)
        ):
            ids, mask = sequences[rows], attention_mask[rows]
            logprobs, values = self.policy_outputs(ids, mask, start)
            ref_logprobs = self.reference_logprobs(ids, mask, start)
            scores = None
            if self.reward_model is not None:
                scores = self.rollout_layout.rewards(self.reward_model, ids, mask, start)
            parts.append((logprobs, values, ref_logprobs, scores))
        logprobs, values, ref_logprobs, scores = (
            torch.cat(column) if column[0] is not None else None for column in zip(*parts, strict=True)
        )
        parts = {name: self.text_scores(fn, rollout) for name, (fn, _) in self.reward_fns.items()}
        if scores is None:
            scores = sum(weight * parts[name] for name, (_, weight) in self.reward_fns.items())
        experience = build_experience(
            rollout,
            logprobs,
            ref_logprobs,
            values,
            scores,
            self.tokenizer.eos_token_id,
            self.kl_coef,
            hp.kl_estimator,
            hp.gamma,
            hp.lam,
            hp.whiten_advantages,
            hp.missing_eos_penalty,
            hp.advantage_estimator,
            hp.num_generations,
            hp.kl_in_reward,
        )
        experience = correct_for_engine(experience, hp.engine_is_correction, hp.engine_is_cap)
        return experience._replace(reward_parts=parts)

    def text_scores(self, fn: Callable[[str, str], float], rollout: Rollout) -> Tensor:
        """``(b,)`` float32 ``fn(prompt, response)`` on the decoded texts, without special tokens."""
        prompts = self.tokenizer.batch_decode(rollout.sequences[:, : rollout.prompt_length], skip_special_tokens=True)
        responses = decode_responses(self.tokenizer, rollout)
        scores = [float(fn(p, r)) for p, r in zip(prompts, responses, strict=True)]
        return torch.tensor(scores, dtype=torch.float32, device=rollout.sequences.device)

    def _log_rollout(self, experience: Experience) -> None:
        """Rollout statistics, averaged over every rank's sequences."""
        kl, scores, mask = experience.kl, experience.scores, experience.mask
        stats = {
            "objective/scores": scores.mean(),
            "objective/kl": kl.mean(),
            "objective/non_score_reward": -self.kl_coef * kl.mean(),
            "objective/rlhf_reward": (scores - self.kl_coef * kl).mean(),
            # -log π of sampled tokens: a Monte Carlo estimate of the (tempered) policy's entropy per token.
            "objective/entropy": -masked_mean(experience.logprobs, mask),
            "response_length": mask.sum(-1).float().mean(),
            "eos_fraction": experience.ended.float().mean(),
            "empty_fraction": experience.empty.float().mean(),
        }
        if self.judge_fn is not None:
            stats["objective/judge"] = self.text_scores(self.judge_fn, experience.rollout).mean()
        if experience.reward_parts:
            stats.update({f"objective/reward/{name}": part.mean() for name, part in experience.reward_parts.items()})
        if self.hparams.num_generations > 1:
            stats.update(
                {f"objective/{k}": v for k, v in group_statistics(scores, self.hparams.num_generations).items()}
            )
        for name, value in stats.items():
            self.log(f"train/{name}", value, sync_dist=True, prog_bar=name == "objective/scores")
        if experience.rollout.logprobs is not None:  # the engine's log-probs against the policy's, per token
            for name, value in engine_mismatch(experience.logprobs, experience.rollout.logprobs, mask).items():
                self.log(f"train/rollout/{name}", value, sync_dist=True, reduce_fx=name.rpartition("_")[2])

    # -- PPO --------------------------------------------------------------------------------------------
    def ptx_loss(self, batch: dict[str, Tensor], rows: Tensor) -> Tensor:
        """Mean next-token loss over the pretraining text of ``rows`` (PPO-ptx's ``-log π(x)``, per token); a prompt
        carries one text, whatever its number of responses."""
        rows = rows[:: self.hparams.num_generations] // self.hparams.num_generations  # minibatches hold whole groups
        ids, attention, labels = (batch[f"ptx_{k}"][rows] for k in ("input_ids", "attention_mask", "labels"))
        logprobs, scored = shifted_logprobs(forward_logits(self.model, ids, attention), labels)
        return -masked_mean(logprobs, scored)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        hp = self.hparams
        if hp.ptx_coef and "ptx_input_ids" not in batch:
            raise ValueError("ptx_coef > 0 needs pretraining text: set the PromptDataModule's pretrain_path")
        if len(batch["input_ids"]) < hp.num_mini_batches:
            raise ValueError(
                f"a rollout batch of {len(batch['input_ids'])} prompts cannot make num_mini_batches="
                f"{hp.num_mini_batches} minibatches: raise the data batch_size (or lower num_mini_batches)"
            )
        with self.seeded(TRAIN_STREAM, self.rollouts):
            experience = self.make_experience(batch)
            n_groups = len(experience.scores) // hp.num_generations
            order = [torch.randperm(n_groups) for _ in range(hp.ppo_epochs)]
        self.rollouts += 1
        self._log_rollout(experience)
        if batch_idx == 0:  # the first rollout of every epoch
            self._log_samples("train/samples", batch, experience)
        self.log("train/kl_coef", self.kl_coef)

        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        rollout, size = experience.rollout, len(experience.scores)
        stats: dict[str, list[Tensor]] = defaultdict(list)
        for permutation in order:
            # Exactly num_mini_batches near-even minibatches of whole groups (10 in 4: 3, 3, 2, 2; chunk would make
            # 3, 3, 3, 1), so that max_steps = rollouts · ppo_epochs · num_mini_batches holds.
            for rows in group_minibatches(permutation.to(self.device), hp.num_generations, hp.num_mini_batches):
                mask = experience.mask[rows]
                logprobs, values = self.policy_outputs(
                    rollout.sequences[rows], rollout.attention_mask[rows], rollout.prompt_length
                )
                policy_loss, policy_stats = ppo_policy_loss(
                    logprobs,
                    experience.logprobs[rows],
                    experience.advantages[rows],
                    mask,
                    hp.clip_range,
                    hp.loss_aggregation,
                    hp.max_new_tokens,
                )
                loss = policy_loss
                if values is not None:
                    value_loss, value_stats = ppo_value_loss(
                        values, experience.values[rows], experience.returns[rows], mask, hp.clip_range_value
                    )
                    loss = loss + hp.vf_coef * value_loss
                    stats["loss/value"].append(value_loss.detach())
                    stats["value/clipfrac"].append(value_stats["clipfrac"])
                if hp.kl_loss_coef:
                    kl = kl_penalty(logprobs, experience.ref_logprobs[rows], "k3")  # GRPO's, on the policy's graph
                    kl_loss = aggregate_loss(kl, mask, hp.loss_aggregation, hp.max_new_tokens)
                    loss = loss + hp.kl_loss_coef * kl_loss
                    stats["loss/kl"].append(kl_loss.detach())
                if hp.ptx_coef:
                    ptx = self.ptx_loss(batch, rows)
                    loss = loss + hp.ptx_coef * ptx
                    stats["loss/ptx"].append(ptx.detach())
                optimizer.zero_grad()
                self.manual_backward(loss)
                norms = clip_grad_norms(optimizer.optimizer, hp.max_grad_norm)  # policy's, value function's if any
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                stats["loss/policy"].append(policy_loss.detach())
                stats["policy/clipfrac"].append(policy_stats["clipfrac"])
                stats["policy/approxkl"].append(policy_stats["approx_kl"])
                for name, norm in zip(("policy/grad_norm", "value/grad_norm"), norms, strict=False):
                    stats[name].append(norm)
        for name, values in stats.items():
            self.log(f"train/{name}", torch.stack(values).mean(), sync_dist=True)

        if hp.target_kl is not None:
            kl = self.trainer.strategy.reduce(experience.kl.mean(), reduce_op="mean")  # every rank: the same β
            self.kl_coef = adaptive_kl_coef(
                self.kl_coef, float(kl), hp.target_kl, size * self.trainer.world_size, hp.kl_horizon
            )

    # -- validation -------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # States last reset under trainer.validate's inference mode could not be updated in fit's no-grad mode.
        # In float32: bf16-true casts them with the module.
        reset_float32(self.val_metrics.values())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with self.seeded(VAL_STREAM, batch_idx):
            experience = self.make_experience(batch)
        kl, scores = experience.kl, experience.scores
        values = {
            "objective/scores": scores,
            "objective/kl": kl,
            "objective/rlhf_reward": scores - self.kl_coef * kl,
            "response_length": experience.mask.sum(-1).float(),
        }
        if self.judge_fn is not None:
            values["objective/judge"] = self.text_scores(self.judge_fn, experience.rollout)
        for name, metric in self.val_metrics.items():
            metric.update(values[name])
            self.log(f"val/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "objective/scores")
        if batch_idx == 0:
            self._log_samples("val/samples", batch, experience)

    def _log_samples(self, tag: str, batch: dict[str, Tensor], experience: Experience) -> None:
        """The first ``log_samples`` prompts, responses and scores as a TensorBoard text table (global rank 0)."""
        if not self.hparams.log_samples or not isinstance(self.logger, TensorBoardLogger):
            return
        if not self.trainer.is_global_zero:
            return
        n, rollout = self.hparams.log_samples, experience.rollout
        prompts = self.tokenizer.batch_decode(rollout.sequences[:n, : rollout.prompt_length], skip_special_tokens=True)
        responses = self.tokenizer.batch_decode(experience.rollout.responses[:n], skip_special_tokens=True)
        rows = ["| prompt | response | score |", "|---|---|---|"]
        for prompt, response, score in zip(prompts, responses, experience.scores[:n].tolist(), strict=True):
            rows.append(f"| {prompt!r} | {response!r} | {score:.3f} |")
        self.logger.experiment.add_text(tag, "\n".join(rows), self.global_step)

    # -- optimisation and export ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        value = self.value_head if self.value_head is not None else self.value_model
        groups = [{"params": trainable(self.model)}]  # policy, value function (if any): clipped apart
        if value is not None:
            groups.append({"params": trainable(value)})
        if value is not None and self.hparams.value_lr is not None:
            groups[1]["lr"] = self.hparams.value_lr
        return optimizer_config(groups, self.optimizer_factory, self.scheduler_factory)

    def setup(self, stage: str) -> None:
        check_fit_setup(self, stage)

    def on_train_start(self) -> None:
        """Refuse, before the first rollout, an epoch whose last (short) batch has fewer prompts than
        ``num_mini_batches``: it would otherwise fail in the middle of the run."""
        loader = self.trainer.train_dataloader
        if not isinstance(loader, DataLoader) or loader.batch_size is None:
            return
        prompts = len(loader.sampler)  # on each rank: Lightning's distributed sampler splits the prompts
        last = prompts % loader.batch_size
        if 0 < last < self.hparams.num_mini_batches:
            raise ValueError(
                f"the last batch of each epoch holds {last} prompts ({prompts} prompts per process, batch_size "
                f"{loader.batch_size}), too few for num_mini_batches={self.hparams.num_mini_batches}: lower "
                "num_mini_batches or choose a batch_size that leaves a fuller last batch"
            )

    def on_train_end(self) -> None:
        export_trained(self)
