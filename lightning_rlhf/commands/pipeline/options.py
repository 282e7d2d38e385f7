"""The pipeline's options: its parser (``--help``), and the checks that refuse a run that cannot work before anything
trains (stages, who ranks and who judges, the stage configs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_rlhf.commands.pipeline.argv import (
    DEFAULT_STAGES,
    OWN_PASSES,
    OWN_SFT_LR,
    RL_CONFIGS,
    STAGE_CONFIGS,
    STAGES,
)

CONFIGS = Path(__file__).resolve().parents[3] / "configs"  # a clone's (or an editable install's) configs/


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
    if rounds > 1 and not ({"rm", "ppo"} <= set(stages) or "dpo" in stages):
        return "--rounds above 1 needs rm and ppo (iterated RLHF) or dpo (iterated DPO) in --stages"
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


def ptx_error(args: argparse.Namespace, stages: list[str]) -> str | None:
    """Why PPO-ptx cannot run: on your task, the toy's second skill's texts are no pretraining text of yours."""
    if "ppo_ptx" in stages and (args.demonstrations or args.prompts) and not args.ptx_texts:
        return (
            'ppo_ptx on your task needs its pretraining text: --ptx_texts texts.jsonl ({"text": …} records, e.g. '
            "what your base model was trained on); the default is the toy's second skill's texts"
        )
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


def build_parser(description: str) -> argparse.ArgumentParser:
    """``lightning-rlhf pipeline``'s options, its ``--help`` headed by ``description``."""
    parser = argparse.ArgumentParser(
        prog="lightning-rlhf pipeline",
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run the whole pipeline for each seed")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of iterated RLHF (sample, rank, RM, PPO) and, with dpo in --stages, of iterated DPO (sample the "
        "last DPO policy, rank, DPO from it)",
    )
    parser.add_argument(
        "--dpo_reference",
        choices=["sft", "last"],
        default="sft",
        help="iterated DPO's reference: the SFT model, or the last round's policy",
    )
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
        "--restart",
        action="store_true",
        help="start over: run every stage again (by default the same command run again skips the stages that "
        "finished with the same settings and inputs, and resumes a stopped one from its last checkpoint)",
    )
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
    parser.add_argument(
        "--ptx_texts",
        default=None,
        help="the ppo_ptx stage's pretraining text, {\"text\": …} records (default: the toy's second skill's, "
        "naming a word's last letter; needed with ppo_ptx on your task)",
    )
    parser.add_argument("--model", default=None, help="local Hugging Face base model for SFT (default: embedded)")
    parser.add_argument(
        "--stages", nargs="+", default=None, help=f"any of {', '.join(STAGES)} (default: {' '.join(DEFAULT_STAGES)})"
    )
    return parser
