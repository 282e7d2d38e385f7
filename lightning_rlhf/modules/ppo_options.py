"""PPOModule's settings checked where they are given, so that nonsense fails at once with the allowed range named:
the constructor's arguments (``check_ppo_options``), and what only the data shows (``check_rollout_batch`` at each
rollout, ``check_last_batch`` before the first)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from lightning_rlhf.losses.policy import KL_ESTIMATORS
from lightning_rlhf.rl.async_rollouts import ROLLOUT_MODES
from lightning_rlhf.rl.engines import check_engine_options
from lightning_rlhf.rl.experience import check_critic_free_args
from lightning_rlhf.rl.generation import check_generation_options, check_sampling_options
from lightning_rlhf.rl.updates import check_objective
from lightning_rlhf.validation import check_range

# (argument, allowed values as the error names them, test): "name=value: must be <allowed>" (``check_range``).
RANGES: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("max_new_tokens", ">= 1", lambda n: n >= 1),
    ("kl_coef", ">= 0", lambda beta: beta >= 0),
    ("clip_range", "> 0", lambda epsilon: epsilon > 0),
    ("clip_range_value", "> 0", lambda clip: clip > 0),
    ("vf_coef", ">= 0", lambda coef: coef >= 0),
    ("gamma", "in [0, 1]", lambda gamma: 0 <= gamma <= 1),
    ("lam", "in [0, 1]", lambda lam: 0 <= lam <= 1),
    ("ptx_coef", ">= 0", lambda coef: coef >= 0),
    ("max_grad_norm", "> 0 or None", lambda norm: norm is None or norm > 0),
    ("kl_horizon", ">= 1", lambda horizon: horizon >= 1),
    ("log_samples", ">= 0", lambda n: n >= 0),
    ("target_kl", "> 0 (or None for a fixed kl_coef)", lambda kl: kl is None or kl > 0),
    ("forward_batch_size", ">= 1 (or None for the whole batch)", lambda rows: rows is None or rows >= 1),
    ("ppo_epochs", ">= 1", lambda epochs: epochs >= 1),
    ("num_mini_batches", ">= 1", lambda n: n >= 1),
    ("dpo_beta", "> 0", lambda beta: beta > 0),
    ("dpo_nll_weight", ">= 0", lambda weight: weight >= 0),
    ("max_staleness", ">= 0", lambda versions: versions >= 0),
    ("sync_every", ">= 1", lambda updates: updates >= 1),
    ("max_turns", ">= 1", lambda turns: turns >= 1),
    ("max_episode_tokens", ">= 1", lambda tokens: tokens >= 1),
)


def check_ppo_options(options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first of PPOModule's arguments (``options``: name -> value, its hparams) that
    is out of range or not one of its choices; the reward imports and models are not touched."""
    sources = ("reward_model_name_or_path", "reward_fn", "reward_fns", "environment")
    if sum(options[source] is not None for source in sources) != 1:
        raise ValueError(
            "give PPOModule exactly one of reward_model_name_or_path, reward_fn, reward_fns and environment"
        )
    if options["environment"] is not None and (options["rollout_mode"], options["objective"]) != ("sync", "clipped"):
        raise ValueError(
            "environment: episodes are sampled with rollout_mode='sync' and trained with objective='clipped' "
            f"(got {options['rollout_mode']!r}, {options['objective']!r})"
        )
    check_critic_free_args(
        options["advantage_estimator"], options["num_generations"], options["loss_aggregation"], options["value_head"]
    )
    check_objective(
        options["objective"],
        options["num_generations"],
        options["advantage_estimator"],
        options["value_head"],
        options["dpo_loss_type"],
        options["dpo_nll_weight"],
    )
    check_sampling_options(options["temperature"], options["top_k"], options["top_p"])
    check_generation_options(options["cache_implementation"], options["compile_generation"])
    check_engine_options(
        options["rollout_engine"], options["engine_is_correction"], options["engine_is_cap"], options["rollout_mode"]
    )
    check_rollout_mode(options["rollout_mode"], options["rollout_engine"], options["objective"])
    if options["kl_estimator"] not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={options['kl_estimator']!r} is not one of {sorted(KL_ESTIMATORS)}")
    for name, allowed, ok in RANGES:
        check_range(name, options[name], allowed, ok(options[name]))


def check_rollout_mode(rollout_mode: str, rollout_engine: str, objective: str) -> None:
    """``sync``, or ``async`` (``rl.async_rollouts``) with what it corrects for so far: the hf engine in the rollout
    worker, the clipped objective (which the decoupled loss replaces)."""
    if rollout_mode not in ROLLOUT_MODES:
        raise ValueError(f"rollout_mode={rollout_mode!r} is not one of {list(ROLLOUT_MODES)}")
    if rollout_mode == "async" and (rollout_engine, objective) != ("hf", "clipped"):
        raise ValueError(
            f"rollout_mode='async' runs rollout_engine='hf' with objective='clipped' (got {rollout_engine!r}, "
            f"{objective!r}): use rollout_mode='sync' for the others"
        )


def check_rollout_batch(batch: dict[str, Tensor], ptx_coef: float, num_mini_batches: int) -> None:
    """A batch of prompts that one PPO iteration can use: pretraining text where PPO-ptx needs it, and at least one
    prompt per minibatch."""
    if ptx_coef and "ptx_input_ids" not in batch:
        raise ValueError("ptx_coef > 0 needs pretraining text: set the PromptDataModule's pretrain_path")
    if len(batch["input_ids"]) < num_mini_batches:
        raise ValueError(
            f"a rollout batch of {len(batch['input_ids'])} prompts cannot make num_mini_batches="
            f"{num_mini_batches} minibatches: raise the data batch_size (or lower num_mini_batches)"
        )


def check_last_batch(loader: Any, num_mini_batches: int) -> None:
    """Refuse, before the first rollout, an epoch of prompts (per process: Lightning's distributed sampler splits
    them) whose last, short batch has fewer prompts than ``num_mini_batches``: it would otherwise fail in the middle
    of the run."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return
    prompts, batch_size = len(loader.sampler), loader.batch_size
    last = prompts % batch_size
    if 0 < last < num_mini_batches:
        raise ValueError(
            f"the last batch of each epoch holds {last} prompts ({prompts} prompts per process, batch_size "
            f"{batch_size}), too few for num_mini_batches={num_mini_batches}: lower "
            "num_mini_batches or choose a batch_size that leaves a fuller last batch"
        )
