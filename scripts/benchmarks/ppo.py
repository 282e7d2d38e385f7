"""``ppo``: our PPO iteration (one rollout batch, then 2 epochs × 2 minibatches of updates), split into sampling,
scoring and updating, one row per advantage estimator of ``--estimators`` (and per engine with ``--engine vllm``;
padded then shared with ``--shared-prompt``); beside our ``grpo``, TRL's ``GRPOTrainer`` (TRL 1.x has no PPOTrainer).

The same sequences per rollout for every estimator: gae samples 1 response for each of ``--batch-size`` prompts, a
group estimator G = ``--num-generations`` for each of ``--batch-size`` / G prompts (and builds no value model)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .common import Row, adamw, fit_lightning, peak_memory_mib, sync, train_hf, trl_args, trl_name
from .data import prompts_path


def plan(args: argparse.Namespace) -> list[Row]:
    engines = ["hf", "vllm"] if args.engine == "vllm" else ["hf"]
    if args.shared_prompt:  # each estimator (on each engine asked for) padded, then shared; no TRL row
        layouts = ("padded", "shared")
        return [
            Row(estimator=e, rollout_engine=n, layout=lay) for e in args.estimators for n in engines for lay in layouts
        ]
    rows = [Row(estimator=e, rollout_engine=n) for n in engines for e in args.estimators]
    return rows + ([Row(impl="trl")] if "grpo" in args.estimators else [])


def measure(args: argparse.Namespace, row: Row, model_dir: str) -> dict:
    return run_grpo_trl(args, model_dir) if row.impl == "trl" else run_ours(args, row, model_dir)


def reward_model_from(model_dir: str) -> str:
    """A reward model made from the initial model (a fresh scalar head), exported to a temp directory."""
    from lightning_rlhf.data.tokenizer import load_tokenizer
    from lightning_rlhf.models.export import export_pretrained
    from lightning_rlhf.models.reward import load_reward_model

    tokenizer = load_tokenizer(model_dir)
    return str(export_pretrained(load_reward_model(model_dir, tokenizer), tokenizer, Path(tempfile.mkdtemp()) / "rm"))


def run_ours(args: argparse.Namespace, row: Row, model_dir: str) -> dict:
    """PPO iterations on toy prompts: the policy and reference from the initial model, a reward (and value) model
    made from it; every response runs to ``--max-new-tokens`` (an untrained model rarely stops)."""
    from lightning_rlhf import PPOModule, PromptDataModule

    rm_dir = reward_model_from(model_dir)

    class Timed(PPOModule):
        """Records, per rollout, the seconds spent sampling and scoring and the real tokens of its sequences."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rollout_stats: list[tuple[float, float, int]] = []
            self.scoring = 0.0

        def make_experience(self, batch):
            sync(args.device)
            start = time.perf_counter()
            experience = super().make_experience(batch)
            total = time.perf_counter() - start
            self.rollout_stats.append(
                (total - self.scoring, self.scoring, int(experience.rollout.attention_mask.sum()))
            )
            return experience

        def score_rollout(self, rollout):
            sync(args.device)
            start = time.perf_counter()
            experience = super().score_rollout(rollout)
            sync(args.device)
            self.scoring = time.perf_counter() - start
            return experience

    group = 1 if row.estimator == "gae" else args.num_generations
    module = Timed(
        model_dir,
        rm_dir,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        ppo_epochs=2,
        num_mini_batches=2,
        advantage_estimator=row.estimator,
        num_generations=group,
        optimizer=adamw(1e-6),
        rollout_engine=row.rollout_engine,
        shared_prompt=row.layout == "shared",
    )
    data = PromptDataModule(
        train_path=prompts_path(args),
        tokenizer_name_or_path=model_dir,
        val_fraction=0,
        batch_size=args.batch_size // group,
        max_length=args.max_length,
    )
    seconds, _ = fit_lightning(args, module, data, steps_per_batch=4)
    timed = module.rollout_stats[args.warmup : args.warmup + args.steps]
    sampling, scoring, tokens = (sum(column) for column in zip(*timed, strict=True))
    engine = ", vllm engine" if row.rollout_engine == "vllm" else ""
    return {
        "impl": f"lightning_rlhf ({row.estimator}, G = {group}{engine})"
        + (" shared" if row.layout == "shared" else ""),
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / args.steps,
        "episodes_per_s": args.batch_size * args.steps / seconds,
        "sampling_share": sampling / seconds,
        "scoring_share": scoring / seconds,
        "update_share": 1 - (sampling + scoring) / seconds,
        "peak_mem_mib": peak_memory_mib(args.device),
    }


def run_grpo_trl(args: argparse.Namespace, model_dir: str) -> dict:
    """TRL's ``GRPOTrainer`` at ours' GRPO shape: ``--batch-size`` completions per generation (G =
    ``--num-generations`` for each of batch / G prompts), 2 passes (``num_iterations``) over 2 minibatches
    (``steps_per_generation``), a reward model made from the initial model, β = 0.05 (a reference, as ours), and with
    ``--engine vllm`` on CUDA vLLM colocated (``use_vllm=True, vllm_mode="colocate"``) as ours is."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lightning_rlhf.data.records import read_records

    rm_dir = reward_model_from(model_dir)
    records, _ = read_records(prompts_path(args), "prompt")
    per_rollout = 4  # optimiser steps: 2 iterations x 2 minibatches
    timed = argparse.Namespace(**{**vars(args), "warmup": args.warmup * per_rollout, "steps": args.steps * per_rollout})
    # On CPU TRL's colocated vLLM fails to load weights (vLLM's CPU layers repack theirs): there TRL uses generate.
    vllm = {}
    if args.engine == "vllm" and args.device == "cuda":
        vllm = {
            "use_vllm": True,
            "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": 0.3,
            "vllm_importance_sampling_correction": False,
        }
    shared = {**trl_args(timed), "per_device_train_batch_size": args.batch_size // 2, "bf16": args.dtype == "bfloat16"}
    shared.pop("max_length")  # GRPO's prompts are not truncated here (ours neither: max_length is the data's)
    config = GRPOConfig(
        **shared,
        steps_per_generation=2,
        num_iterations=2,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        beta=0.05,
        learning_rate=1e-6,
        **vllm,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)),
        reward_funcs=rm_dir,
        args=config,
        train_dataset=datasets.Dataset.from_list([{"prompt": r.fields["prompt"]} for r in records]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    seconds = train_hf(timed, trainer)
    return {
        "impl": f"{trl_name()} GRPOTrainer (G = {args.num_generations}{', vllm colocate' if vllm else ''})",
        "tokens_per_s": float("nan"),
        "step_s": seconds / args.steps,
        "episodes_per_s": args.batch_size * args.steps / seconds,
        "peak_mem_mib": peak_memory_mib(args.device),
    }
