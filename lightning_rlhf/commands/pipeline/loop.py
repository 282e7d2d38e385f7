"""``lightning-rlhf pipeline``: the InstructGPT loop end to end, each stage a ``lightning-rlhf`` command, evaluated on
held-out prompts. Without options, the embedded toy task on a CPU with honest gold-judge numbers (the README's main
job, also ``python scripts/pipeline.py``):

    lightning-rlhf pipeline                     # one seed, one round: about 3.7 minutes on 2 CPU cores
    lightning-rlhf pipeline --seeds 0 1 2       # three seeds: the README's means and spreads
    lightning-rlhf pipeline --rounds 2          # iterated RLHF
    lightning-rlhf pipeline --noise 0.1         # a noisy simulated labeller
    lightning-rlhf pipeline --overoptimization  # also PPO pushed far past the gold optimum, for the plot

Your own task: the same loop on your files, with your judge (a function ``(prompt, response) -> float``) as the
simulated labeller and the evaluation judge, and only the stages you ask for (default: every stage but grpo, rloo):

    lightning-rlhf pipeline --demonstrations demos.jsonl --prompts prompts.jsonl --judge mypkg.judge.score \
        [--held_out held_out.jsonl] [--model path/to/hf_base_model] [--stages sft rm ppo grpo dpo]

On your task SFT and the reward model train for passes over your data, stop early on their validation and export
their best validation's model (``--sft_passes``, ``--rm_passes``: at most that many; SFT at ``--sft_lr``); PPO, GRPO
and RLOO export their best validation's policy, by the judge's score (by the KL-penalised reward without a judge); the
toy run keeps its configs' steps and last models. A worked example, the Caesar shift with its judge:
``examples/own_task`` (README, "Your own task: a worked example").

People instead of a judge: ``--label people`` stops after sampling, writes the samples to rank and prints the
``lightning-rlhf label`` commands, then the command that resumes with ``--comparisons`` (the ``label --aggregate``
output): SFT is reused, nothing is sampled again, the reward model and DPO train on that file. With no ``--judge``
the evaluation is the reward model's (its scores, win rates and Elo by it, its validation accuracy on the
comparisons, the RL runs' KL); gold numbers need ``--judge``.

1. SFT on the shipped demonstrations                  lightning-rlhf fit --config configs/sft.yaml
2. fresh prompts (none of them held out), K samples   lightning-rlhf sample --judge gold --noise σ
   each from the SFT model, ranked by the simulated
   labeller (gold judge + noise)
3. a reward model on those rankings                   lightning-rlhf fit --config configs/rm.yaml
4. PPO against that reward model, SFT as reference,   lightning-rlhf fit --config configs/ppo.yaml
   watching the gold judge (judge_fn) on the side;     ... --model.init_args.judge_fn=lightning_rlhf.toy.gold_score
   and, as a yardstick, PPO against the gold judge     ... --model.init_args.reward_fn=lightning_rlhf.toy.gold_score
   itself (what a perfect reward model would give)
5. DPO on the same rankings                           lightning-rlhf fit --config configs/dpo.yaml
6. rounds 2 … R (``--rounds``): K samples of fresh prompts from the last round's PPO policy are ranked, the last
   round's reward model is fine-tuned on every comparison so far, and PPO continues from the last policy (reference:
   SFT)
7. evaluation on held-out prompts nobody trained on: gold score of every model, greedy and sampled at the rollout
   temperature; win rates against SFT and Elo ratings (``lightning_rlhf.evaluation``) from the sampled responses,
   prompt by prompt; the reward model's pairwise accuracy against the gold judge on the SFT model's own samples;
   best-of-n with the reward model (n = 1 … 16) as the baseline to PPO; and the over-optimisation plot: gold score
   and reward-model score against KL (Gao et al. 2022), for PPO and best-of-n (``lightning_rlhf.commands.pipeline.evaluation``).

Every stage is the CLI a user would run, so the shipped configs (``--configs``, default the clone's ``configs/``) are
what is measured. The summary is printed and written to ``outputs/pipeline/summary.json`` with
``outputs/pipeline/overoptimization.png`` and ``win_rates.png`` (``--outputs`` moves everything; with several seeds
each seed's run is in ``outputs/seedN/`` and the summary holds means and spreads). ``summary.json`` also holds a
``diagnosis``: per stage, what looks wrong and what to try (``lightning_rlhf.evaluation.diagnosis``), printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import reduction
from pathlib import Path

import torch

from lightning_rlhf.commands.pipeline.evaluation import (
    best_of_n_curve,
    demonstrations_score,
    model_scores,
    plot_overoptimization,
    ppo_curve,
    reward_accuracy,
    reward_model_scores,
    rm_validation_accuracy,
    sft_curve,
    sft_samples,
)
from lightning_rlhf.data.records import read_records
from lightning_rlhf.evaluation.diagnosis import diagnose
from lightning_rlhf.evaluation.judges import import_reward_fn, reward_model_scorer
from lightning_rlhf.evaluation.ratings import plot_win_rates, rating_report
from lightning_rlhf.io import save_figure_atomic, write_json_atomic, write_jsonl_atomic
from lightning_rlhf.toy import make_prompts

CONFIGS = Path(__file__).resolve().parents[3] / "configs"  # a clone's (or an editable install's) configs/


HELD_OUT_SEED = 1234  # the shipped demonstrations use seed 0, the shipped prompts seed 1


GOLD = "lightning_rlhf.toy.gold_score"


BEST_OF = 16


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


RL_CONFIGS = {"ppo": "ppo.yaml", "grpo": "grpo.yaml", "rloo": "rloo.yaml"}


STAGE_CONFIGS = {"sft": "sft.yaml", "rm": "rm.yaml", **RL_CONFIGS, "ppo_gold_reward": "ppo.yaml", "dpo": "dpo.yaml"}


STAGES = tuple(STAGE_CONFIGS)


DEFAULT_STAGES = ("sft", "rm", "ppo", "ppo_gold_reward", "dpo")


NO_JUDGE = (
    "no judge: the policies are scored by the reward model (rm_greedy, rm_sampled; win rates and Elo by it), the "
    "reward model by its validation split of the comparisons; gold numbers need --judge package.fn"
)


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (``configs/sft.yaml`` from a clone's root)."""
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


LIGHTNING_RLHF = (sys.executable, "-m", "lightning_rlhf")


# How a stage's ``lightning-rlhf`` command runs: ``launch(argv, threads, log)`` -> its exit status; ``threads`` its
# share of the cores (``None``: all of them), ``log`` the file its output goes to (``None``: this terminal).
Launcher = Callable[[list[str], "int | None", "Path | None"], int]


def stage_environment(threads: int | None) -> dict[str, str]:
    """This process's environment as it is now, with a stage's share of the cores as ``OMP_NUM_THREADS``."""
    return os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})


def in_new_process(program: tuple[str, ...] = LIGHTNING_RLHF) -> Launcher:
    """Each command a fresh ``program`` (``python -m lightning_rlhf``), its share of the cores as OMP_NUM_THREADS."""

    def launch(argv: list[str], threads: int | None, log: Path | None) -> int:
        env = stage_environment(threads)
        with log.open("w") if log else contextlib.nullcontext() as out:
            err = subprocess.STDOUT if out else None
            return subprocess.run([*program, *argv], env=env, stdout=out, stderr=err).returncode

    return launch


class ParentStream:
    """This process's file descriptor ``fd`` (1: stdout, 2: stderr) as a warm stage receives it: a duplicate sent with
    the process, as multiprocessing sends a ``Connection`` (the forked process's own are the forkserver's, where this
    process's output went when it started the forkserver)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return ParentStream.received, (reduction.DupFd(self.fd),)

    @staticmethod
    def received(duplicate) -> int:
        return duplicate.detach()


def forked_stage(
    entry: Callable[[list[str]], None],
    argv: list[str],
    threads: int | None,
    output: Path | tuple[int, int],
    environment: dict[str, str],
) -> None:
    """A stage in its process forked from the warm one (``warm``): stdout and stderr to ``output`` (a log file, or
    the launching process's streams as ``ParentStream`` delivers them), the launching process's ``environment`` as
    it is now (``stage_environment``; the forkserver's is as it was when it started), ``threads`` threads (torch read
    OMP_NUM_THREADS when the forkserver imported it), then ``entry(argv)``; its ``SystemExit`` status is the
    process's."""
    os.environ.clear()
    os.environ.update(environment)
    if isinstance(output, Path):
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        output = (fd, fd)
    for stream, fd in zip((1, 2), output, strict=True):
        os.dup2(fd, stream)
    for fd in set(output):
        os.close(fd)
    if threads:
        import torch

        torch.set_num_threads(threads)
    entry(argv)


def warm(entry: Callable[[list[str]], None]) -> Launcher:
    """Each command in a process forked from one that imported ``lightning_rlhf`` once (multiprocessing's
    ``forkserver``, which never runs a tensor operation, so its children start clean): a fresh
    ``python -m lightning_rlhf`` spends about 5 s of CPU importing torch, Lightning and transformers, once per stage,
    4 of them one after the other in the toy run. ``entry``: what runs a command, ``lightning_rlhf.cli.main`` (the CLI
    passes it in: the pipeline, a layer below the CLI, never imports it)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lightning_rlhf.cli", "lightning_rlhf.commands.pipeline.loop"])

    def launch(argv: list[str], threads: int | None, log: Path | None) -> int:
        output = log or (ParentStream(1), ParentStream(2))
        environment = stage_environment(threads)
        process = context.Process(target=forked_stage, args=(entry, argv, threads, output, environment))
        process.start()
        process.join()
        return process.exitcode

    return launch


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def side_by_side(commands: dict[str, list[str]], jobs: int, logs: Path, launch: Launcher) -> dict[str, float]:
    """Run the ``lightning-rlhf`` commands of stages that need none of each other's outputs, at most ``jobs`` at once,
    each with its share of the cores; returns each stage's wall time. One command at a time writes to this terminal;
    several write to ``logs/<stage>.log``, and a failure names its log and shows its end, once the others have
    finished.

    On 2 CPU cores the toy's stages are small kernels that a second thread speeds up by only 1.1-1.25x (sampling
    1.2 s vs 1.4 s per 4,096 responses, DPO 13.4 s vs 15.2 s, 600 reward-model steps 43 s vs 54 s), so two stages
    on a core each finish well before the two one after the other on both."""
    alone = len(commands) <= 1 or jobs == 1
    threads = None if alone else max(1, cores() // min(jobs, len(commands)))
    if not alone:
        logs.mkdir(parents=True, exist_ok=True)

    def one(stage: str, args: list[str]) -> float:
        log = None if alone else logs / f"{stage}.log"
        shared = "" if alone else f"  [side by side, {threads} thread(s), log: {log}]"
        print(f"$ lightning-rlhf {' '.join(args)}{shared}", flush=True)
        start = time.perf_counter()
        status = launch(args, threads, log)
        if status and log is None:
            raise SystemExit(
                f"error: lightning-rlhf {args[0]} above failed (exit status {status}); its message is above"
            )
        if status:
            tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
            raise SystemExit(f"error: stage {stage} failed (exit status {status}); {log} ends:\n{tail}")
        return time.perf_counter() - start

    if alone:
        return {stage: one(stage, args) for stage, args in commands.items()}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {stage: pool.submit(one, stage, args) for stage, args in commands.items()}
    return {stage: future.result() for stage, future in futures.items()}


def steps_per_pass(config: Path, source: str, kind: str) -> float:
    """Optimiser steps in one pass over the training share of ``source``'s ``kind`` records, at ``config``'s
    ``data.init_args`` ``batch_size`` and ``val_fraction``: 2,000 records, 0.05 held out, batches of 32 -> 59.375."""
    import yaml

    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    records, _ = read_records(source, kind)
    return len(records) * (1 - (data.get("val_fraction") or 0.0)) / data["batch_size"]


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


def write_prompts(path: Path, n: int, seed: int, exclude: set[str]) -> Path:
    """``n`` fresh toy prompts, none of them in ``exclude`` (the held-out evaluation prompts)."""
    prompts = [record for record in make_prompts(n + len(exclude), seed=seed) if record["prompt"] not in exclude]
    return write_jsonl_atomic(prompts[:n], path)


def prompt_key(prompt: str | list) -> str:
    """A prompt as a set member: chat prompts (lists of messages) as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def read_prompts(path: str) -> list:
    records, _ = read_records(path, "prompt")
    return [record.fields["prompt"] for record in records]


def split_held_out(prompts: list, n: int) -> tuple[list, list]:
    """``n`` of ``prompts`` held out (drawn with ``HELD_OUT_SEED``) and the rest, in file order, to train on."""
    if not 0 < n < len(prompts):
        raise ValueError(
            f"--eval_prompts={n}: must be between 1 and the {len(prompts)} --prompts less one (the "
            "rest train the policy), or name a --held_out file"
        )
    held = set(random.Random(HELD_OUT_SEED).sample(range(len(prompts)), n))
    return [p for i, p in enumerate(prompts) if i in held], [p for i, p in enumerate(prompts) if i not in held]


def user_prompts_to_rank(path: Path, prompts: list, n: int, seed: int) -> Path:
    """``n`` of the user's training prompts (all of them when there are fewer), a different draw each round."""
    drawn = random.Random(seed).sample(prompts, min(n, len(prompts)))
    return write_jsonl_atomic([{"prompt": prompt} for prompt in drawn], path)


def run(
    args: argparse.Namespace, seed: int, outputs: Path, held_out: list, train_prompts: list | None, launch: Launcher
) -> dict | None:
    """The pipeline's ``args.stages`` for one seed, everything under ``outputs``; returns its summary, or ``None``
    when it stopped after sampling for people to rank (``--label people``).
    ``train_prompts``: the user's prompts to rank and train the policy on, ``None`` for fresh toy prompts;
    ``launch``: how each stage's command runs (``warm`` or ``in_new_process``)."""
    pipeline = outputs / "pipeline"
    seconds: dict[str, float] = {}
    excluded = {prompt_key(p) for p in held_out}
    stages = args.stages
    judge = import_reward_fn(args.judge) if args.judge else None
    labeller = "gold" if args.judge == GOLD else args.judge
    train_prompts_path = None
    own_task = args.demonstrations is not None or train_prompts is not None  # else the toy run, its configs' steps
    if train_prompts is not None:
        train_prompts_path = write_jsonl_atomic([{"prompt": p} for p in train_prompts], pipeline / "prompts.jsonl")

    def fit(
        stage: str,
        config: str,
        *extra: str,
        scheduler: bool = True,
        steps: int | None = None,
        val_every: int | None = None,
    ) -> dict:
        """``{stage: arguments}`` of one ``lightning-rlhf fit`` of ``config`` (under ``--configs``) writing under
        ``outputs/stage``; ``steps`` (or ``--max_steps``, which wins) overrides the config's optimiser steps,
        schedule length and validation interval (every ``val_every`` steps, else once at the end). A stage of
        ``STAGES`` not asked for gives ``{}``: the later stages reuse its export under ``outputs``."""
        if stage in STAGES and stage not in stages:
            return {}
        where = outputs / stage
        overrides = [
            f"--trainer.default_root_dir={where}",
            f"--trainer.logger.init_args.save_dir={where}",
            f"--model.init_args.export_dir={where / 'hf'}",
            f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}",
        ]
        steps = args.max_steps or steps
        if steps:
            interval = min(val_every or steps, steps)
            overrides += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={interval}"]
            if scheduler:
                overrides.append(f"--model.init_args.scheduler.init_args.total_iters={steps}")
        return {stage: ["fit", "--config", shown(args.configs / config), *overrides, *extra]}

    def sample(stage: str, policy: Path, round_: int, *ranking: str) -> tuple[Path, dict]:
        """``pipeline/stage.jsonl`` and ``{stage: arguments}`` of the ``sample`` that writes K samples of each of this
        round's prompts from ``policy`` into it, ranked with ``ranking`` (``--judge``, ``--noise``) or left for
        people to rank."""
        draw = 10_000 + 100 * seed + round_
        if train_prompts is None:
            prompts = write_prompts(pipeline / f"{stage}_prompts.jsonl", args.rank_prompts, draw, excluded)
        else:
            prompts = user_prompts_to_rank(pipeline / f"{stage}_prompts.jsonl", train_prompts, args.rank_prompts, draw)
        samples = pipeline / f"{stage}.jsonl"
        return samples, {
            stage: [
                "sample",
                "--model",
                str(policy),
                "--prompts",
                str(prompts),
                "--k",
                str(args.k),
                *ranking,
                "--temperature",
                str(args.temperature),
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
        }

    def ranked_samples(stage: str, policy: Path, round_: int) -> tuple[Path, dict]:
        return sample(stage, policy, round_, "--judge", labeller, "--noise", str(args.noise))

    def rl(stage: str, policy: Path, *reward: str, config: str = "ppo.yaml", **overrides: str) -> dict:
        extra = [f"--model.init_args.{key}={value}" for key, value in overrides.items()]
        if args.max_steps:  # validation counts rollouts, ppo_epochs · num_mini_batches = 4 steps each
            extra.append(f"--trainer.val_check_interval={max(1, args.max_steps // 4)}")
        if train_prompts_path:
            extra.append(f"--data.init_args.train_path={train_prompts_path}")
        if own_task:  # the toy run keeps its configs' last policy
            extra += best_weights(*RL_WATCHED[args.judge is not None])
        return fit(
            stage,
            config,
            f"--model.init_args.model_name_or_path={policy}",
            f"--model.init_args.seed={seed}",
            *reward,
            *extra,
            scheduler=False,
        )

    def for_passes(stage: str, config: str, source: str, kind: str, *extra: str) -> dict:
        """``fit`` of an own task's ``stage`` for at most ``--{stage}_passes`` passes over ``source``, validated after
        each and stopped early (``OWN_PASSES``)."""
        per_pass = steps_per_pass(args.configs / config, source, kind)
        passes = getattr(args, f"{stage}_passes") or OWN_PASSES[stage]
        return fit(
            stage,
            config,
            *extra,
            *early_stopping(stage),
            steps=max(1, math.ceil(passes * per_pass)),
            val_every=max(1, round(per_pass)),
        )

    def together(*groups: dict) -> None:
        commands = {stage: arguments for group in groups for stage, arguments in group.items()}
        seconds.update(side_by_side(commands, args.jobs, pipeline / "logs", launch))

    # Each stage starts once what it reads exists, beside the others that can (--jobs): SFT; the ranked samples beside
    # PPO against the judge (it needs only SFT); the reward model; the policies against it beside DPO.
    sft = outputs / "sft" / "hf"
    own = [f"--data.init_args.train_path={args.demonstrations}"] if args.demonstrations else []
    own += [f"--model.init_args.model_name_or_path={args.model}"] if args.model else []
    if own_task and args.demonstrations and "sft" in stages:
        lr = f"--model.init_args.optimizer.init_args.lr={args.sft_lr or OWN_SFT_LR}"
        together(for_passes("sft", "sft.yaml", args.demonstrations, "demonstration", *own, lr))
    else:
        together(fit("sft", "sft.yaml", *own))
    if args.label == "people":
        together(sample("samples", sft, 1)[1])
        return None
    watch = (f"--model.init_args.judge_fn={args.judge}",) if args.judge else ()
    gold_reward = rl(
        "ppo_gold_reward",
        sft,
        "--model.init_args.reward_model_name_or_path=null",
        f"--model.init_args.reward_fn={args.judge}",
        *watch,
    )
    ranked = {"rm", "dpo"} & set(stages)  # else nothing trains on the rankings
    first, sampling = Path(args.comparisons or pipeline / "comparisons.jsonl"), {}
    if ranked and not args.comparisons:  # else people ranked the samples of a run stopped by --label people
        first, sampling = ranked_samples("comparisons", sft, 1)
    comparisons = [first]
    together(sampling, gold_reward)
    from_sft = f"--model.init_args.model_name_or_path={sft}"
    # Rewards centred on the demonstrations: the toy's, or the user's own.
    toy_normalization = f"--data.init_args.normalize_path={args.demonstrations or 'toy:demonstrations'}"
    rm_data = (from_sft, f"--data.init_args.train_path={first}", toy_normalization)
    if own_task and "rm" in stages:
        together(for_passes("rm", "rm.yaml", str(first), "comparison", *rm_data))
    else:
        together(fit("rm", "rm.yaml", *rm_data))
    against_rm = (f"--model.init_args.reward_model_name_or_path={outputs / 'rm' / 'hf'}", *watch)
    trained_on_rankings = [rl(name, sft, *against_rm, config=config) for name, config in RL_CONFIGS.items()]
    if args.overoptimization:  # no KL penalty, 3x the learning rate, twice the rollouts: past the gold optimum
        steps = 2 * (args.max_steps or 480)
        trained_on_rankings.append(
            rl(
                "ppo_overoptimized",
                sft,
                *against_rm,
                f"--trainer.max_steps={steps}",
                kl_coef="0.0",
                **{"optimizer.init_args.lr": "3e-4"},
            )
        )
    together(*trained_on_rankings, fit("dpo", "dpo.yaml", from_sft, f"--data.init_args.train_path={first}"))

    policies = {"sft": sft} | {name: outputs / name / "hf" for name in RL_CONFIGS if name in stages}
    reward_models = {"reward_model": outputs / "rm" / "hf"} if (outputs / "rm" / "hf").is_dir() else {}
    for round_ in range(2, args.rounds + 1):
        last = policies["ppo" if round_ == 2 else f"ppo_round{round_ - 1}"]
        round_comparisons, sampling = ranked_samples(f"comparisons_round{round_}", last, round_)
        together(sampling)
        comparisons.append(round_comparisons)
        everything = write_jsonl_atomic(
            [json.loads(line) for path in comparisons for line in path.read_text().splitlines()],
            pipeline / f"comparisons_up_to_round{round_}.jsonl",
        )
        last_rm = reward_models["reward_model" if round_ == 2 else f"reward_model_round{round_ - 1}"]
        together(
            fit(
                f"rm_round{round_}",
                "rm.yaml",
                f"--model.init_args.model_name_or_path={last_rm}",
                f"--data.init_args.train_path={everything}",
                f"--model.init_args.optimizer.init_args.lr={RM_ROUND_LR}",
                toy_normalization,
                steps=RM_ROUND_STEPS,
            )
        )
        together(
            rl(
                f"ppo_round{round_}",
                last,
                f"--model.init_args.ref_model_name_or_path={sft}",
                f"--model.init_args.reward_model_name_or_path={outputs / f'rm_round{round_}' / 'hf'}",
                *watch,
            )
        )
        policies[f"ppo_round{round_}"] = outputs / f"ppo_round{round_}" / "hf"
        reward_models[f"reward_model_round{round_}"] = outputs / f"rm_round{round_}" / "hf"
    policies |= {name: outputs / name / "hf" for name in ("ppo_gold_reward", "dpo") if name in stages}
    if args.overoptimization:
        policies["ppo_overoptimized"] = outputs / "ppo_overoptimized" / "hf"

    start = time.perf_counter()
    summary: dict = {
        "seed": seed,
        "held_out_prompts": len(held_out),
        "sampling_temperature": args.temperature,
        "labeller_noise": args.noise,
        "ranked_prompts_per_round": args.rank_prompts,
        "k": args.k,
        "rounds": args.rounds,
    }
    if args.judge != GOLD:  # the toy's summary stays as it was
        summary |= {"judge": args.judge, "stages": list(stages)}
    if args.comparisons:
        summary["comparisons"] = str(args.comparisons)
    if judge is None:
        summary["evaluation_note"] = NO_JUDGE
    own_judge = judge if args.judge != GOLD else None
    if judge is not None:
        for name, directory in policies.items():
            summary[name] = model_scores(directory, held_out, args.temperature, own_judge)
    elif reward_models:  # nothing but the reward model can tell the policies apart
        reward_model = reward_model_scorer(str(reward_models["reward_model"]), batch_size=256, progress=True)
        for name, directory in policies.items():
            summary[name] = reward_model_scores(directory, held_out, args.temperature, reward_model)
    scored = [name for name in policies if name in summary]
    per_prompt = [summary[name].pop("per_prompt") for name in scored]
    ratings = None
    if len(scored) > 1:  # win rates and Elo against SFT need a second policy
        ratings = rating_report(scored, per_prompt, "sft", bootstrap=1000, seed=seed)
    for name in scored if ratings else ():
        summary[name] |= {
            "win_rate_vs_sft": ratings["win_rate_vs_baseline"][name],
            "win_rate_vs_sft_ci": ratings["win_rate_vs_baseline_ci"][name],
            "elo": ratings["elo"][name],
            "elo_ci": ratings["elo_ci"][name],
        }
    if own_judge is not None and args.demonstrations:  # what SFT imitates, for the diagnosis to compare it with
        summary["demonstrations"] = demonstrations_score(args.demonstrations, own_judge)
    if judge is not None:
        samples = sft_samples(sft, held_out, 4, args.temperature, seed=1)
        for name, directory in reward_models.items():
            summary[name] = reward_accuracy(directory, held_out, samples, judge)
        if reward_models:
            summary["best_of_n"] = best_of_n_curve(
                reward_models["reward_model"],
                held_out,
                sft_samples(sft, held_out, BEST_OF, args.temperature, seed=2),
                judge,
            )
    else:
        for name, directory in reward_models.items():
            summary[name] = rm_validation_accuracy(directory.parent)
    summary["curves"] = {name: ppo_curve(outputs / name) for name in policies if name not in ("sft", "dpo")}
    if "sft" in stages:
        summary["curves"]["sft"] = sft_curve(outputs / "sft")
    seconds["evaluation"] = time.perf_counter() - start
    summary["seconds"] = {stage: round(s, 1) for stage, s in seconds.items()}
    summary["diagnosis"] = diagnose(summary)
    write_json_atomic(summary, pipeline / "summary.json")
    if ratings:
        save_figure_atomic(plot_win_rates(ratings), pipeline / "win_rates.png")
    if "best_of_n" in summary:
        plot_overoptimization(summary, pipeline / "overoptimization.png")
    return summary


def aggregate(runs: list[dict]) -> dict:
    """Means over seeds of every model's and reward model's numbers, with ``<metric>_spread`` = [min, max]."""
    summary = {
        key: runs[0][key]
        for key in (
            "held_out_prompts",
            "sampling_temperature",
            "labeller_noise",
            "k",
            "ranked_prompts_per_round",
            "rounds",
        )
    }
    summary["seeds"] = [run["seed"] for run in runs]
    for name, entry in runs[0].items():
        if not isinstance(entry, dict) or name in ("best_of_n", "curves", "seconds", "diagnosis"):
            continue
        summary[name] = {}
        for metric, value in entry.items():
            if isinstance(value, (int, float)):
                values = [run[name][metric] for run in runs]
                summary[name][metric] = statistics.mean(values)
                summary[name][f"{metric}_spread"] = [min(values), max(values)]
    summary["runs"] = runs
    return summary


def stage_error(stages: list[str], rounds: int, overoptimization: bool, seeds: int, outputs: Path) -> str | None:
    """Why ``stages`` cannot run (a stage unknown, or needing a model neither asked for nor in ``outputs``)."""
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        return f"--stages: unknown {', '.join(unknown)}; choose among {', '.join(STAGES)}"
    if "sft" not in stages and (seeds > 1 or not (outputs / "sft" / "hf").is_dir()):
        return (
            f"--stages without sft (or --skip_sft) reuses {outputs / 'sft' / 'hf'}, which works with one seed "
            "only and must exist: add sft to --stages"
        )
    needs_rm = [stage for stage in RL_CONFIGS if stage in stages] + (["--overoptimization"] if overoptimization else [])
    if needs_rm and "rm" not in stages and (seeds > 1 or not (outputs / "rm" / "hf").is_dir()):
        return f"{', '.join(needs_rm)} train against the reward model: add rm to --stages"
    if rounds > 1 and not {"rm", "ppo"} <= set(stages):
        return "--rounds above 1 needs rm and ppo in --stages"
    return None


def labelling_error(args: argparse.Namespace, stages: list[str]) -> str | None:
    """Why who ranks the samples (``args.label``, ``args.comparisons``) and who judges (``args.judge``, ``None`` for
    nobody) cannot go together with ``stages`` and the other options."""
    people = "--label people" if args.label == "people" else "--comparisons" if args.comparisons else None
    if args.label == "people" and args.comparisons:
        return (
            "--label people stops for people to rank the samples and --comparisons resumes with their rankings: "
            "give one of them"
        )
    if args.judge is None and people is None:
        return (
            "your task (--prompts) needs --judge package.module.fn to rank the samples and score the models, or "
            "people to rank them: --label people"
        )
    if people and (args.rounds > 1 or len(args.seeds) > 1):
        return f"{people} runs one round of one seed: people rank once (drop --rounds / give one --seeds)"
    if people and not {"rm", "dpo"} & set(stages):
        return f"{people}: nothing trains on the rankings; add rm or dpo to --stages"
    without_judge = [stage for stage in stages if stage == "ppo_gold_reward"]
    without_judge += ["--overoptimization"] if args.overoptimization else []
    if args.judge is None and without_judge:
        return f"{', '.join(without_judge)} needs a judge: give --judge package.module.fn or leave it out"
    return None


def configs_error(configs: Path, stages: list[str], overoptimization: bool) -> str | None:
    """Why the stage configs the run needs are not under ``configs``."""
    needed = {STAGE_CONFIGS[stage] for stage in stages} | ({"ppo.yaml"} if overoptimization else set())
    missing = sorted(name for name in needed if not (configs / name).is_file())
    if missing:
        return (
            f"--configs {configs}: no {', '.join(missing)} there. The stage configs ship in the repository's "
            "configs/ directory: run from a clone (pip install -e .) or pass --configs path/to/clone/configs"
        )
    return None


def resume_command(argv: list[str], outputs: Path, comparisons: Path) -> str:
    """The pipeline command that carries on once people have ranked: ``argv`` less ``--label`` and ``--outputs``
    (with their values), then the outputs and the comparisons named."""
    kept: list[str] = []
    value_follows = False
    for arg in argv:
        if value_follows:
            value_follows = False
        elif arg.split("=", 1)[0] in ("--label", "--outputs"):
            value_follows = "=" not in arg
        else:
            kept.append(arg)
    return shlex.join(
        ["lightning-rlhf", "pipeline", *kept, "--outputs", str(outputs), "--comparisons", str(comparisons)]
    )


def people_instructions(argv: list[str], outputs: Path) -> str:
    """What to run after ``--label people`` stopped: rank, aggregate, resume."""
    pipeline = outputs / "pipeline"
    samples, labels, comparisons = (pipeline / name for name in ("samples.jsonl", "labels.jsonl", "comparisons.jsonl"))
    return "\n".join(
        [
            f"\nThe samples for people to rank are in {samples}. Next, from this directory:",
            "1. people rank them in a web page (http://127.0.0.1:8000; needs pip install 'lightning_rlhf[label]'; "
            "stop it when every item is labelled, --labellers-per-item N for several labellers per item):",
            "   " + shlex.join(["lightning-rlhf", "label", "--input", str(samples), "--output", str(labels)]),
            "2. their labels become comparisons (add --consensus borda for one ranking per item):",
            "   " + shlex.join(["lightning-rlhf", "label", "--aggregate", str(labels), "--output", str(comparisons)]),
            f"3. the pipeline resumes from them (SFT reused from {outputs / 'sft' / 'hf'}, nothing sampled again):",
            "   " + resume_command(argv, outputs, comparisons),
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-rlhf pipeline",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run the whole pipeline for each seed")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of iterated RLHF (sample, rank, RM, PPO)")
    parser.add_argument(
        "--rank_prompts",
        type=int,
        default=16000,
        help="prompts ranked per round (fresh ones on the "
        "toy; a draw of --prompts, all of them when fewer, on your task)",
    )
    parser.add_argument("--k", type=int, default=8, help="samples per prompt to rank")
    parser.add_argument("--noise", type=float, default=0.0, help="the simulated labeller's noise on gold scores")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling (rollout) temperature")
    parser.add_argument(
        "--eval_prompts",
        type=int,
        default=300,
        help="held-out prompts for the evaluation (toy prompts, or a seeded share of --prompts when no --held_out)",
    )
    parser.add_argument("--overoptimization", action="store_true", help="also PPO with no KL penalty, pushed hard")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="where every stage writes")
    parser.add_argument(
        "--configs",
        type=Path,
        default=CONFIGS,
        help=f"the stage configs (default: the repository's configs/, {CONFIGS})",
    )
    parser.add_argument("--max_steps", type=int, default=None, help="override every stage's optimiser steps")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="stages run side by side when none needs another's "
        "output, each on its share of the cores (default: 2 without a GPU, 1 with one: stages on one "
        "GPU would share its memory)",
    )
    parser.add_argument("--skip_sft", action="store_true", help="reuse OUTPUTS/sft/hf (one seed only)")
    parser.add_argument("--demonstrations", default=None, help="SFT's demonstrations (default: the toy's)")
    parser.add_argument("--prompts", default=None, help="prompts to rank and train the policy on (default: toy)")
    parser.add_argument("--held_out", default=None, help="evaluation prompts (default: a share of --prompts)")
    parser.add_argument(
        "--judge",
        default=None,
        help="package.module.fn (prompt, response) -> float: the simulated "
        "labeller and the evaluation judge (default: the toy's gold judge on the toy task; needed on "
        "your task unless people rank)",
    )
    parser.add_argument(
        "--label",
        choices=("judge", "people"),
        default="judge",
        help="who ranks the samples: the "
        "judge (a simulated labeller), or people: stop after sampling, print the label commands and "
        "the command that resumes with --comparisons",
    )
    parser.add_argument(
        "--comparisons",
        default=None,
        help="comparison records (label --aggregate's output) for rm "
        "and dpo instead of sampling and ranking; reuses OUTPUTS/sft/hf when it is there",
    )
    parser.add_argument(
        "--sft_passes",
        type=float,
        default=None,
        help="your task: SFT's most passes over the "
        f"--demonstrations, stopping early on the validation loss (default {OWN_PASSES['sft']:g}; the "
        "toy run: sft.yaml's steps)",
    )
    parser.add_argument(
        "--sft_lr",
        type=float,
        default=None,
        help=f"your task: SFT's learning rate (default {OWN_SFT_LR:g}; the toy run: sft.yaml's)",
    )
    parser.add_argument(
        "--rm_passes",
        type=float,
        default=None,
        help="your task: the reward model's most passes over "
        f"the ranked prompts, stopping early on the validation accuracy (default {OWN_PASSES['rm']:g}; "
        "the toy run: rm.yaml's steps)",
    )
    parser.add_argument("--model", default=None, help="local Hugging Face base model for SFT (default: embedded)")
    parser.add_argument(
        "--stages", nargs="+", default=None, help=f"any of {', '.join(STAGES)} (default: {' '.join(DEFAULT_STAGES)})"
    )
    return parser


def main(argv: list[str] | None = None, entry: Callable[[list[str]], None] | None = None) -> dict | None:
    """Runs the pipeline as ``argv`` asks; returns the summary, or ``None`` when it stopped for people to rank.
    ``entry``: the CLI's ``main``, for stages forked warm from this process (``None``: each stage a fresh process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.outputs = args.outputs.resolve()
    args.configs = args.configs.resolve()
    args.judge = args.judge or (GOLD if args.prompts is None else None)  # the toy's gold judge on the toy task
    reuse_sft = args.skip_sft or (args.comparisons is not None and (args.outputs / "sft" / "hf").is_dir())
    defaults = [stage for stage in DEFAULT_STAGES if args.judge or stage != "ppo_gold_reward"]
    asked = [stage for stage in args.stages or defaults if not (stage == "sft" and reuse_sft)]
    gpu = torch.cuda.is_available()
    if args.jobs is None:
        args.jobs = 1 if gpu else 2
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.rounds < 1 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--rounds must be >= 1 and --seeds distinct")
    error = (
        stage_error(asked, args.rounds, args.overoptimization, len(args.seeds), args.outputs)
        or labelling_error(args, asked)
        or configs_error(args.configs, asked, args.overoptimization)
    )
    if error:
        parser.error(error)
    args.stages = [stage for stage in STAGES if stage in asked]  # in the order they run
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # The stages (python -m lightning_rlhf, in this directory) import a judge module lying here; so does this
        # process, which scores with it, even when started as the lightning-rlhf console script.
        sys.path.insert(0, str(Path.cwd()))
    # Without a GPU the stages start warm. With one, fresh: a process forked from one that touched CUDA (an import
    # may) cannot use it, and 5 s of imports matter little there.
    forkable = entry is not None and not gpu and "forkserver" in multiprocessing.get_all_start_methods()
    launch = warm(entry) if forkable else in_new_process()
    if args.judge not in (None, GOLD):
        import_reward_fn(args.judge)  # a judge that cannot be imported fails now, not after SFT
    if args.comparisons:
        read_records(args.comparisons, "comparison")  # a bad record fails now, naming its line, not after SFT

    outputs = args.outputs
    train_prompts = None
    if args.prompts:
        train_prompts = read_prompts(args.prompts)
        if args.held_out:
            held_out = read_prompts(args.held_out)
            overlap = {prompt_key(p) for p in held_out} & {prompt_key(p) for p in train_prompts}
            train_prompts = [p for p in train_prompts if prompt_key(p) not in overlap]  # nobody trains on held-out
        else:
            held_out, train_prompts = split_held_out(train_prompts, args.eval_prompts)
    elif args.held_out:
        held_out = read_prompts(args.held_out)
    else:
        held_out = [record["prompt"] for record in make_prompts(args.eval_prompts, seed=HELD_OUT_SEED)]
    start = time.perf_counter()
    if len(args.seeds) == 1:
        summary = run(args, args.seeds[0], outputs, held_out, train_prompts, launch)
        if summary is None:
            print(people_instructions(argv, outputs))
            return None
    else:
        runs = [run(args, seed, outputs / f"seed{seed}", held_out, train_prompts, launch) for seed in args.seeds]
        summary = aggregate(runs)
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(summary, outputs / "pipeline" / "summary.json")
    report(summary, args, outputs)
    return summary


def report(summary: dict, args: argparse.Namespace, outputs: Path) -> None:
    seeds = f" (mean over seeds {summary['seeds']}, [min, max])" if "seeds" in summary else ""
    judged = "Gold-judge scores on held-out prompts (1.0 = every reversal exact)"
    if args.judge is None:
        judged = "Reward-model scores on held-out prompts (no judge: gold numbers need --judge package.fn)"
    elif args.judge != GOLD:
        judged = f"Scores of the judge {args.judge} on held-out prompts"
    scale = "gold" if args.judge else "rm"
    print(f"\n{judged}{seeds}:")
    print(
        f"  {'model':18s} {'greedy':>8s} {'sampled (T=' + str(args.temperature) + ')':>16s} {'win vs SFT':>11s} "
        f"{'Elo':>6s}"
    )
    for name, entry in summary.items():
        if isinstance(entry, dict) and f"{scale}_greedy" in entry:
            spread = entry.get(f"{scale}_sampled_spread")
            spread = f"  [{spread[0]:.3f}, {spread[1]:.3f}]" if spread else ""
            rated = f"{entry['win_rate_vs_sft']:11.3f} {entry['elo']:6.0f}" if "elo" in entry else f"{'-':>11} {'-':>6}"
            print(f"  {name:18s} {entry[f'{scale}_greedy']:8.3f} {entry[f'{scale}_sampled']:16.3f} {rated}{spread}")
    judge = "gold judge" if args.judge == GOLD else args.judge
    if "demonstrations" in summary:
        print(f"  {'(demonstrations)':18s} {summary['demonstrations']['gold_mean']:8.3f}  the data SFT imitates")
    for name, entry in summary.items():
        if name.startswith("reward_model") and "rm_pairwise_accuracy_vs_gold" in entry:
            print(
                f"{name} vs {judge}: {entry['rm_pairwise_accuracy_vs_gold']:.3f} pairwise accuracy on "
                f"{entry['rm_eval_pairs']:.0f} held-out pairs of SFT samples"
            )
        elif name.startswith("reward_model") and "val_accuracy_on_comparisons" in entry:
            print(
                f"{name}: {entry['val_accuracy_on_comparisons']:.3f} pairwise accuracy on its validation split of "
                f"{args.comparisons}"
            )
    if args.judge is None:
        for name, curve in summary.get("curves", {}).items():
            if curve.get("kl"):
                print(f"{name}: KL to SFT {curve['kl'][-1]:.3f} nats per response at its last validation")
        if not any(isinstance(entry, dict) and "rm_greedy" in entry for entry in summary.values()):
            print("No judge and no reward model: nothing scored the policies; add rm to --stages or give --judge")
    for run in summary.get("runs", [summary]):
        seed = f" (seed {run['seed']})" if "runs" in summary else ""
        findings = run.get("diagnosis", {})
        print(f"Diagnosis{seed}: " + ("nothing looks wrong" if not findings else ""))
        for stage, lines in findings.items():
            for line in lines:
                print(f"  {stage}: {line}")
    written = [
        name
        for name in ("summary.json", "overoptimization.png", "win_rates.png")
        if (outputs / "pipeline" / name).exists()
    ]
    print(f"Total {summary['total_seconds']:.0f} s; written to {outputs / 'pipeline'} ({', '.join(written)})")
