"""The ``lightning-rlhf`` command line (argv) of each pipeline stage, as pure functions of explicit inputs: the run's
``Run`` (configs, outputs, seed, ``--max_steps``, …) and the paths of the stages it reads. Nothing here runs,
reads or writes anything; ``loop.run`` chains these commands and ``launch`` runs them."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

GOLD = "lightning_rlhf.toy.gold_score"


# Rounds 2 … R fine-tune the last round's reward model on every comparison so far (a warm start keeps what it learnt:
# retrained from SFT on round 1 + 2 comparisons for the same 2,400 steps it fell from 0.885 to 0.756 against the
# gold judge, and PPO round 2 fell below round 1; warm, 1,200 steps at lr 3e-4 it reached 0.892 and round 2 ≥ round 1).
RM_ROUND_STEPS = 1200


RM_ROUND_LR = 3e-4


# Stages in the order they run, each with its config under --configs; the RL ones train a policy from SFT against
# the reward model, ``ppo_gold_reward`` against the judge itself (what a perfect reward model would give). Without
# --stages: the toy run of the README (less ppo_gold_reward when there is no judge).
# On your own task (--demonstrations / --prompts) SFT and the reward model do not run the toy's step counts: they
# train for at most --sft_passes / --rm_passes passes over your data, are validated after each pass, stop once
# PATIENCE validations in a row have not beaten their best (Lightning's EarlyStopping on the watched metric) and
# export the best validation's weights (``callbacks.BestWeights``). The toy run keeps its configs' steps. On the
# Caesar example (examples/own_task) patience 3 stopped SFT on a plateau of its validation loss before it had learnt
# the task (seeds 1, 2); patience 10 let the reward model train all 30 passes, and PPO / GRPO against it drifted far
# from SFT and lost to it (seed 0).
# SFT's learning rate on your task is OWN_SFT_LR (--sft_lr), not sft.yaml's 3e-3 (the toy's): on the Caesar example
# 3e-3 learnt the shift on seed 0 only (greedy 0.901; seeds 1, 2 memorised the demonstrations and sat on a
# validation-loss plateau, 0.617 / 0.601), 1e-3 on seeds 1, 2 only (0.886 / 0.905; seed 0 0.680), 3e-4 on all three
# (0.913 / 0.889 / 0.928; seeds 3, 4 too, where 3e-3 learnt seed 3 only), its validation loss falling with the
# training loss instead of stalling above it.
OWN_SFT_LR = 3e-4


OWN_PASSES = {"sft": 60.0, "rm": 30.0}


WATCHED = {"sft": ("val/loss", "min"), "rm": ("val/accuracy", "max")}


PATIENCE = {"sft": 10, "rm": 3}


# On your own task the RL stages (PPO, GRPO, RLOO, and PPO against the judge) export the policy of their best
# validation (``callbacks.BestWeights``, no early stop: they run their configs' rollouts): by the judge's mean score
# (``judge_fn``, logged as val/objective/judge) when there is a judge, else by the KL-penalised reward the policy
# maximises (score - β·KL, val/objective/rlhf_reward; the reward model's score alone keeps rising as the policy
# drifts from SFT). Validation rollouts are of PromptDataModule's val_fraction of the training prompts, never of the
# held-out evaluation prompts, which main() removes from them. On the Caesar example (seed 0) PPO's validation judge
# score fell 0.977 -> 0.948 over its last validations as its KL rose: the last policy is not the best one.
RL_WATCHED = {True: ("val/objective/judge", "max"), False: ("val/objective/rlhf_reward", "max")}  # by: a judge?


# The RL module's stages against the reward model: PPO, GRPO, RLOO, online DPO (its ``dpo`` objective, Guo et al.
# 2024: pairs of the current policy's samples ranked by the reward model, where offline ``dpo`` learns from the SFT
# model's ranked samples) and PPO-ptx (PPO plus the language-model loss on the toy's second skill's text, or on
# --ptx_texts).
RL_CONFIGS = {
    "ppo": "ppo.yaml",
    "grpo": "grpo.yaml",
    "rloo": "rloo.yaml",
    "dpo_online": "dpo_online.yaml",
    "ppo_ptx": "ppo_ptx.yaml",
}


STAGE_CONFIGS = {"sft": "sft.yaml", "rm": "rm.yaml", **RL_CONFIGS, "ppo_gold_reward": "ppo.yaml", "dpo": "dpo.yaml"}


STAGES = tuple(STAGE_CONFIGS)


DEFAULT_STAGES = ("sft", "rm", "ppo", "ppo_gold_reward", "dpo")


@dataclass(frozen=True)
class Run:
    """What every stage command of one seed's run shares."""

    configs: Path
    """The stage configs (``--configs``)."""
    outputs: Path
    """Where every stage writes: ``outputs/<stage>``, its export in ``outputs/<stage>/hf``."""
    seed: int
    """The seed of every stage's model and data."""
    max_steps: int | None = None
    """``--max_steps``: every stage's optimiser steps (``None``: the config's, or the stage's own)."""
    train_prompts: Path | None = None
    """The user's prompts the RL stages train on (``None``: their configs')."""
    best_by: tuple[str, str] | None = None
    """``(monitor, mode)`` the RL stages export their best validation's policy by (``None``: their last policy)."""
    ptx_texts: str | None = None
    """``--ptx_texts``: PPO-ptx's pretraining text (``None``: its config's, the toy's second skill's texts)."""


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (``configs/sft.yaml`` from a clone's root)."""
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def export(run: Run, stage: str) -> Path:
    """Where ``stage`` exports its model, for the stages that read it."""
    return run.outputs / stage / "hf"


def asked(commands: dict[str, list[str]], stages: Collection[str]) -> dict[str, list[str]]:
    """``commands`` (stage -> argv) less the stages of ``STAGES`` not among ``stages`` (the later stages reuse their
    exports under the outputs); stages outside ``STAGES`` (sampling, the later rounds) always run."""
    return {stage: argv for stage, argv in commands.items() if stage not in STAGES or stage in stages}


def fit_argv(
    run: Run,
    stage: str,
    config: str,
    *extra: str,
    scheduler: bool = True,
    steps: int | None = None,
    val_every: int | None = None,
) -> list[str]:
    """One ``lightning-rlhf fit`` of ``config`` (under ``run.configs``) writing under ``run.outputs/stage``, then
    ``extra``; ``steps`` (or ``run.max_steps``, which wins) overrides the config's optimiser steps, schedule length
    (when ``scheduler``) and validation interval (every ``val_every`` steps, else once at the end)."""
    where = run.outputs / stage
    overrides = [
        f"--trainer.default_root_dir={where}",
        f"--trainer.logger.init_args.save_dir={where}",
        f"--model.init_args.export_dir={where / 'hf'}",
        f"--seed_everything={run.seed}",
        f"--data.init_args.seed={run.seed}",
    ]
    steps = run.max_steps or steps
    if steps:
        interval = min(val_every or steps, steps)
        overrides += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={interval}"]
        if scheduler:
            overrides.append(f"--model.init_args.scheduler.init_args.total_iters={steps}")
    return ["fit", "--config", shown(run.configs / config), *overrides, *extra]


def best_weights(monitor: str, mode: str) -> list[str]:
    """The ``fit`` arguments that add ``callbacks.BestWeights`` on ``monitor``: the export is the best validation's
    model, not the last one."""
    return [
        "--trainer.callbacks+=lightning_rlhf.training.callbacks.BestWeights",
        f"--trainer.callbacks.monitor={monitor}",
        f"--trainer.callbacks.mode={mode}",
    ]


def early_stopping(stage: str) -> list[str]:
    """The ``fit`` arguments that add Lightning's ``EarlyStopping`` on ``stage``'s ``WATCHED`` metric and
    ``BestWeights`` on the same metric."""
    monitor, mode = WATCHED[stage]
    return [
        "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
        f"--trainer.callbacks.monitor={monitor}",
        f"--trainer.callbacks.mode={mode}",
        f"--trainer.callbacks.patience={PATIENCE[stage]}",
        *best_weights(monitor, mode),
    ]


def for_passes_argv(run: Run, stage: str, config: str, per_pass: float, passes: float, *extra: str) -> list[str]:
    """``fit_argv`` of an own task's ``stage`` for at most ``passes`` passes of ``per_pass`` optimiser steps each,
    validated after each pass and stopped early (``early_stopping``)."""
    return fit_argv(
        run,
        stage,
        config,
        *extra,
        *early_stopping(stage),
        steps=max(1, math.ceil(passes * per_pass)),
        val_every=max(1, round(per_pass)),
    )


def sft_argv(
    run: Run,
    demonstrations: str | None,
    model: str | None,
    per_pass: float | None = None,
    passes: float | None = None,
    lr: float | None = None,
) -> list[str]:
    """SFT on ``demonstrations`` (``None``: the config's) from ``model`` (``None``: the config's). On an own task,
    ``per_pass`` (optimiser steps in one pass over the demonstrations) given: at most ``passes`` passes (default
    ``OWN_PASSES``) at ``lr`` (default ``OWN_SFT_LR``), stopped early; else the config's steps and learning rate."""
    own = [f"--data.init_args.train_path={demonstrations}"] if demonstrations else []
    own += [f"--model.init_args.model_name_or_path={model}"] if model else []
    if per_pass is None:
        return fit_argv(run, "sft", "sft.yaml", *own)
    learning_rate = f"--model.init_args.optimizer.init_args.lr={lr or OWN_SFT_LR}"
    return for_passes_argv(run, "sft", "sft.yaml", per_pass, passes or OWN_PASSES["sft"], *own, learning_rate)


def normalization(demonstrations: str | None) -> str:
    """Rewards centred on the demonstrations: the user's, or the toy's."""
    return f"--data.init_args.normalize_path={demonstrations or 'toy:demonstrations'}"


def rm_argv(
    run: Run,
    sft: Path,
    comparisons: Path,
    demonstrations: str | None,
    per_pass: float | None = None,
    passes: float | None = None,
) -> list[str]:
    """The reward model from ``sft`` on ``comparisons``; on an own task, ``per_pass`` given, for at most ``passes``
    passes over them (default ``OWN_PASSES``), stopped early; else the config's steps."""
    data = (
        f"--model.init_args.model_name_or_path={sft}",
        f"--data.init_args.train_path={comparisons}",
        normalization(demonstrations),
    )
    if per_pass is None:
        return fit_argv(run, "rm", "rm.yaml", *data)
    return for_passes_argv(run, "rm", "rm.yaml", per_pass, passes or OWN_PASSES["rm"], *data)


def watching(judge: str | None) -> tuple[str, ...]:
    """The RL arguments that log the judge's score of the policy's responses beside training (``judge_fn``)."""
    return (f"--model.init_args.judge_fn={judge}",) if judge else ()


def rl_argv(
    run: Run, stage: str, policy: Path, *reward: str, config: str = "ppo.yaml", overrides: dict[str, str] | None = None
) -> list[str]:
    """An RL ``stage`` (``config``: PPO, GRPO or RLOO) training ``policy`` against ``reward`` (a reward model or a
    reward function), with ``overrides`` of its ``model.init_args``; no schedule override (the RL configs have none).
    With ``run.max_steps``, validated every 4 optimiser steps (one rollout's ``ppo_epochs · num_mini_batches``)."""
    extra = [f"--model.init_args.{key}={value}" for key, value in (overrides or {}).items()]
    if run.max_steps:  # validation counts rollouts, ppo_epochs · num_mini_batches = 4 steps each
        extra.append(f"--trainer.val_check_interval={max(1, run.max_steps // 4)}")
    if run.train_prompts:
        extra.append(f"--data.init_args.train_path={run.train_prompts}")
    if run.best_by:  # the toy run keeps its configs' last policy
        extra += best_weights(*run.best_by)
    return fit_argv(
        run,
        stage,
        config,
        f"--model.init_args.model_name_or_path={policy}",
        f"--model.init_args.seed={run.seed}",
        *reward,
        *extra,
        scheduler=False,
    )


def gold_reward_argv(run: Run, sft: Path, judge: str | None) -> list[str]:
    """``ppo_gold_reward``: PPO from ``sft`` against the judge itself, no reward model (the yardstick)."""
    reward = ("--model.init_args.reward_model_name_or_path=null", f"--model.init_args.reward_fn={judge}")
    return rl_argv(run, "ppo_gold_reward", sft, *reward, *watching(judge))


def against_rm_argv(run: Run, sft: Path, judge: str | None) -> dict[str, list[str]]:
    """Every RL stage of ``RL_CONFIGS`` (PPO, GRPO, RLOO, online DPO, PPO-ptx) from ``sft`` against the reward model
    ``rm``."""
    reward = (f"--model.init_args.reward_model_name_or_path={export(run, 'rm')}", *watching(judge))
    texts = {"ppo_ptx": [f"--data.init_args.pretrain_path={run.ptx_texts}"] if run.ptx_texts else []}
    return {
        name: rl_argv(run, name, sft, *reward, *texts.get(name, ()), config=config)
        for name, config in RL_CONFIGS.items()
    }


def overoptimized_argv(run: Run, sft: Path, judge: str | None) -> list[str]:
    """``ppo_overoptimized``: PPO against the reward model with no KL penalty, 3x the learning rate and twice the
    rollouts, past the gold optimum (for the over-optimisation plot)."""
    steps = 2 * (run.max_steps or 480)
    reward = (f"--model.init_args.reward_model_name_or_path={export(run, 'rm')}", *watching(judge))
    overrides = {"kl_coef": "0.0", "optimizer.init_args.lr": "3e-4"}
    return rl_argv(run, "ppo_overoptimized", sft, *reward, f"--trainer.max_steps={steps}", overrides=overrides)


def dpo_argv(run: Run, sft: Path, comparisons: Path) -> list[str]:
    """DPO from ``sft`` (also its reference) on ``comparisons``."""
    return fit_argv(
        run,
        "dpo",
        "dpo.yaml",
        f"--model.init_args.model_name_or_path={sft}",
        f"--data.init_args.train_path={comparisons}",
    )


def dpo_round_argv(run: Run, round_: int, last: Path, reference: Path, comparisons: Path) -> list[str]:
    """Round ``round_``'s DPO: the last round's policy ``last`` trained on this round's ``comparisons`` (samples of
    ``last``) against ``reference``."""
    return fit_argv(
        run,
        f"dpo_round{round_}",
        "dpo.yaml",
        f"--model.init_args.model_name_or_path={last}",
        f"--model.init_args.ref_model_name_or_path={reference}",
        f"--data.init_args.train_path={comparisons}",
    )


def rm_round_argv(run: Run, round_: int, last_rm: Path, comparisons: Path, demonstrations: str | None) -> list[str]:
    """Round ``round_``'s reward model: ``last_rm`` fine-tuned on every comparison so far (``comparisons``) for
    ``RM_ROUND_STEPS`` at ``RM_ROUND_LR``."""
    return fit_argv(
        run,
        f"rm_round{round_}",
        "rm.yaml",
        f"--model.init_args.model_name_or_path={last_rm}",
        f"--data.init_args.train_path={comparisons}",
        f"--model.init_args.optimizer.init_args.lr={RM_ROUND_LR}",
        normalization(demonstrations),
        steps=RM_ROUND_STEPS,
    )


def ppo_round_argv(run: Run, round_: int, last: Path, sft: Path, judge: str | None) -> list[str]:
    """Round ``round_``'s PPO: the last round's policy ``last`` trained on, against this round's reward model, with
    ``sft`` as its reference."""
    return rl_argv(
        run,
        f"ppo_round{round_}",
        last,
        f"--model.init_args.ref_model_name_or_path={sft}",
        f"--model.init_args.reward_model_name_or_path={export(run, f'rm_round{round_}')}",
        *watching(judge),
    )


def labeller(judge: str) -> str:
    """The ``sample --judge`` name of the pipeline's judge (``gold``: the toy's)."""
    return "gold" if judge == GOLD else judge


def ranking_argv(judge: str, noise: float) -> list[str]:
    """The ``sample`` arguments that rank the samples by ``judge`` with the simulated labeller's ``noise``."""
    return ["--judge", labeller(judge), "--noise", str(noise)]


def sample_argv(
    policy: Path,
    prompts: Path,
    samples: Path,
    *,
    k: int,
    temperature: float,
    seed: int,
    round_: int,
    ranking: Sequence[str] = (),
) -> list[str]:
    """The ``sample`` that writes ``k`` samples of each of ``prompts`` from ``policy`` into ``samples`` at
    ``temperature``, ranked with ``ranking`` (``ranking_argv``) or, without, left for people to rank; a different
    sampling seed each round."""
    return [
        "sample",
        "--model",
        str(policy),
        "--prompts",
        str(prompts),
        "--k",
        str(k),
        *ranking,
        "--temperature",
        str(temperature),
        "--max_new_tokens",
        "16",
        "--seed",
        str(seed + 1000 * round_),
        "--batch_size",
        "256",
        "--output",
        str(samples),
        "--restart",  # the policy was just trained again: what a killed earlier run sampled is not its
    ]
