"""The pipeline's report: one seed's summary (every model evaluated on the held-out prompts, written to
``pipeline/summary.json`` with its plots), the means and spreads over seeds, the table printed at the end, and what to
run once people were asked to rank."""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from pathlib import Path

from lightning_rlhf.commands.pipeline.argv import GOLD
from lightning_rlhf.commands.pipeline.evaluation import (
    best_of_n_curve,
    demonstrations_score,
    model_scores,
    plot_alignment_tax,
    plot_overoptimization,
    ppo_curve,
    reward_accuracy,
    reward_model_scores,
    rm_validation_accuracy,
    sft_curve,
    sft_samples,
)
from lightning_rlhf.evaluation.diagnosis import diagnose
from lightning_rlhf.evaluation.judges import import_reward_fn, reward_model_scorer
from lightning_rlhf.evaluation.ratings import plot_win_rates, rating_report
from lightning_rlhf.io import save_figure_atomic, write_json_atomic
from lightning_rlhf.toy import SECOND_SKILL_HELD_OUT, second_skill_held_out

BEST_OF = 16


NO_JUDGE = (
    "no judge: the policies are scored by the reward model (rm_greedy, rm_sampled; win rates and Elo by it), the "
    "reward model by its validation split of the comparisons; gold numbers need --judge package.fn"
)


def summarise(
    args: argparse.Namespace,
    seed: int,
    outputs: Path,
    held_out: list,
    policies: dict[str, Path],
    reward_models: dict[str, Path],
    seconds: dict[str, float],
) -> dict:
    """One seed's summary, written to ``outputs/pipeline/summary.json`` with its plots: every one of ``policies``
    (name -> export) scored on ``held_out`` by the judge (``args.judge``; without one, by the reward model), greedy
    and sampled, with win rates and Elo against SFT; every one of ``reward_models`` against the judge (or on its
    validation split); the RL and SFT curves, the stages' wall ``seconds`` and the diagnosis."""
    judge = import_reward_fn(args.judge) if args.judge else None
    start = time.perf_counter()
    pipeline, stages, sft = outputs / "pipeline", args.stages, outputs / "sft" / "hf"
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
    toy_run = args.demonstrations is None and args.prompts is None
    # The toy's second skill, which RL never sees, on as many of its held-out prompts as the task's.
    second_skill = second_skill_held_out(min(args.eval_prompts, SECOND_SKILL_HELD_OUT)) if toy_run else None
    if second_skill:
        summary["second_skill_prompts"] = len(second_skill)
    if judge is not None:
        for name, directory in policies.items():
            summary[name] = model_scores(directory, held_out, args.temperature, own_judge, second_skill)
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
    offline = ("sft", "dpo", *(f"dpo_round{round_}" for round_ in range(2, args.rounds + 1)))  # no RL curves
    summary["curves"] = {name: ppo_curve(outputs / name) for name in policies if name not in offline}
    if "sft" in stages:
        summary["curves"]["sft"] = sft_curve(outputs / "sft")
    seconds = seconds | {"evaluation": time.perf_counter() - start}
    summary["seconds"] = {stage: round(s, 1) for stage, s in seconds.items()}
    summary["diagnosis"] = diagnose(summary)
    write_json_atomic(summary, pipeline / "summary.json")
    if ratings:
        save_figure_atomic(plot_win_rates(ratings), pipeline / "win_rates.png")
    if "best_of_n" in summary:
        plot_overoptimization(summary, pipeline / "overoptimization.png")
    if second_skill and any(curve.get("kl") for curve in summary["curves"].values()):  # an RL policy's KL
        plot_alignment_tax(summary, pipeline / "alignment_tax.png")
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


def report(summary: dict, args: argparse.Namespace, outputs: Path) -> None:
    seeds = f" (mean over seeds {summary['seeds']}, [min, max])" if "seeds" in summary else ""
    judged = "Gold-judge scores on held-out prompts (1.0 = every reversal exact)"
    if args.judge is None:
        judged = "Reward-model scores on held-out prompts (no judge: gold numbers need --judge package.fn)"
    elif args.judge != GOLD:
        judged = f"Scores of the judge {args.judge} on held-out prompts"
    scale = "gold" if args.judge else "rm"
    second = any(isinstance(entry, dict) and "second_skill" in entry for entry in summary.values())
    print(
        f"\n{judged}{seeds}"
        + (" and, under skill 2, the second skill's (the last letter, greedy; RL never trains on it)" * second)
        + ":"
    )
    print(
        f"  {'model':18s} {'greedy':>8s} {'sampled (T=' + str(args.temperature) + ')':>16s} {'win vs SFT':>11s} "
        f"{'Elo':>6s}" + f" {'skill 2':>7s}" * second
    )
    for name, entry in summary.items():
        if isinstance(entry, dict) and f"{scale}_greedy" in entry:
            spread = entry.get(f"{scale}_sampled_spread")
            spread = f"  [{spread[0]:.3f}, {spread[1]:.3f}]" if spread else ""
            rated = f"{entry['win_rate_vs_sft']:11.3f} {entry['elo']:6.0f}" if "elo" in entry else f"{'-':>11} {'-':>6}"
            skill = f" {entry['second_skill']:7.3f}" if "second_skill" in entry else ""
            print(
                f"  {name:18s} {entry[f'{scale}_greedy']:8.3f} {entry[f'{scale}_sampled']:16.3f} {rated}{skill}{spread}"
            )
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
        for name in ("summary.json", "overoptimization.png", "win_rates.png", "alignment_tax.png")
        if (outputs / "pipeline" / name).exists()
    ]
    print(f"Total {summary['total_seconds']:.0f} s; written to {outputs / 'pipeline'} ({', '.join(written)})")
