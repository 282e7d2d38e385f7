"""What ``PPOModule`` logs of its rollouts: a training rollout's statistics, averaged over every rank's sequences,
with the engine's log-probs against the trainer's (``log_rollout``), and prompts, responses and scores as a
TensorBoard text table (``log_samples``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_rlhf.rl.experience import Experience, engine_mismatch
from lightning_rlhf.rl.rollouts import EPISODE_METRICS, rollout_statistics, samples_table

VAL_METRICS = ("objective/scores", "objective/kl", "objective/rlhf_reward", "response_length")


def val_metrics(judge_fn: str | None, environment: str | None) -> tuple[str, ...]:
    """What validation averages: ``VAL_METRICS``, the judge's score (an environment's reward is its judge), and an
    environment's episode statistics."""
    episodes = tuple(f"episode/{name}" for name in EPISODE_METRICS) if environment is not None else ()
    return VAL_METRICS + (("objective/judge",) if judge_fn or environment else ()) + episodes


def log_rollout(module: L.LightningModule, experience: Experience, judge: Tensor | None) -> dict[str, Tensor]:
    """Log the rollout's statistics (``rollouts.rollout_statistics``, ``judge`` the judge's ``(b,)`` scores or
    ``None``) as ``train/*``, averaged over every rank's sequences; returns this rank's."""
    hp = module.hparams
    stats = rollout_statistics(experience, module.kl_coef, hp.num_generations, judge)
    for name, value in stats.items():
        module.log(f"train/{name}", value, sync_dist=True, prog_bar=name == "objective/scores")
    if experience.rollout.logprobs is not None:  # the engine's log-probs against the policy's, per token
        mismatch = engine_mismatch(experience.logprobs, experience.rollout.logprobs, experience.mask)
        for name, value in mismatch.items():
            module.log(f"train/rollout/{name}", value, sync_dist=True, reduce_fx=name.rpartition("_")[2])
    return stats


def log_samples(module: L.LightningModule, tag: str, experience: Experience) -> None:
    """The first ``log_samples`` prompts, responses and scores as a TensorBoard text table (global rank 0)."""
    n = module.hparams.log_samples
    if not n or not isinstance(module.logger, TensorBoardLogger) or not module.trainer.is_global_zero:
        return
    module.logger.experiment.add_text(tag, samples_table(module.tokenizer, experience, n), module.global_step)
