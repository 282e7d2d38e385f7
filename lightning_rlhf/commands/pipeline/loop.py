"""``lightning-rlhf pipeline``: the InstructGPT loop end to end, each stage a ``lightning-rlhf`` command, evaluated on
held-out prompts. Without options, the embedded toy task on a CPU with honest gold-judge numbers (the README's main
job, also ``python scripts/pipeline.py``); with ``--demonstrations``, ``--prompts`` and ``--judge package.fn``, your
task with your judge; with ``--label people``, people rank the samples instead of a judge:

    lightning-rlhf pipeline                     # one seed, one round: about 5 minutes on 2 CPU cores
    lightning-rlhf pipeline --seeds 0 1 2       # three seeds: the README's means and spreads
    lightning-rlhf pipeline --rounds 2          # iterated RLHF (and iterated DPO)
    lightning-rlhf pipeline --demonstrations demos.jsonl --prompts prompts.jsonl --judge mypkg.judge.score \\
        [--held_out held_out.jsonl] [--model path/to/hf_base_model] [--stages sft rm ppo grpo dpo]

Every stage writes under ``--outputs`` (default ``outputs/``): ``outputs/<stage>/`` and its export ``hf/``; the
summary is printed and written to ``outputs/pipeline/summary.json`` with its plots (several seeds: each seed's run in
``outputs/seedN/``, the summary their means and spreads). What each stage runs, and why: docs/pipeline_internals.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_rlhf.commands.pipeline.argv import (
    DEFAULT_STAGES,
    GOLD,
    RL_CONFIGS,
    RL_WATCHED,
    STAGES,
    Run,
    against_rm_argv,
    asked,
    dpo_argv,
    dpo_round_argv,
    export,
    gold_reward_argv,
    overoptimized_argv,
    ppo_round_argv,
    ranking_argv,
    rm_argv,
    rm_round_argv,
    sample_argv,
    sft_argv,
)
from lightning_rlhf.commands.pipeline.inputs import held_out_and_train, prompts_to_rank, steps_per_pass
from lightning_rlhf.commands.pipeline.launch import Launcher, in_new_process, side_by_side, stop_on_signals, warm
from lightning_rlhf.commands.pipeline.options import (
    build_parser,
    configs_error,
    labelling_error,
    ptx_error,
    stage_error,
)
from lightning_rlhf.commands.pipeline.report import aggregate, people_instructions, report, summarise
from lightning_rlhf.commands.pipeline.resume import Manifests
from lightning_rlhf.data.records import read_records
from lightning_rlhf.evaluation.judges import import_reward_fn
from lightning_rlhf.io import write_json_atomic, write_jsonl_atomic


@dataclass
class StageRunner:
    """Runs groups of stage commands, the groups one after the other, a group's stages side by side (``--jobs``), and
    keeps each stage's wall time; a stage that ``manifests`` says is done is skipped, one stopped part-way resumes
    (``resume``)."""

    jobs: int
    logs: Path
    launch: Launcher
    manifests: Manifests
    seconds: dict[str, float] = field(default_factory=dict)

    def together(self, *groups: dict[str, list[str]]) -> None:
        commands = {stage: argv for group in groups for stage, argv in group.items()}
        commands = {stage: now for stage, argv in commands.items() if (now := self.manifests.to_run(stage, argv))}
        self.seconds.update(side_by_side(commands, self.jobs, self.logs, self.launch, self.manifests.finished))


def samples(
    args: argparse.Namespace, run: Run, name: str, policy: Path, round_: int, train_prompts: list | None, held_out: list
) -> tuple[Path, dict[str, list[str]]]:
    """``pipeline/name.jsonl`` and ``{name: argv}`` of the ``sample`` that writes ``--k`` samples of each of this
    round's prompts (written now to ``pipeline/name_prompts.jsonl``) from ``policy`` into it, ranked by the judge
    (``--label judge``) or left for people to rank."""
    pipeline = run.outputs / "pipeline"
    prompts = prompts_to_rank(
        pipeline / f"{name}_prompts.jsonl", args.rank_prompts, run.seed, round_, train_prompts, held_out
    )
    ranking = ranking_argv(args.judge, args.noise) if args.label == "judge" else ()
    output = pipeline / f"{name}.jsonl"
    argv = sample_argv(
        policy, prompts, output, k=args.k, temperature=args.temperature, seed=run.seed, round_=round_, ranking=ranking
    )
    return output, {name: argv}


def run(
    args: argparse.Namespace, seed: int, outputs: Path, held_out: list, train_prompts: list | None, launch: Launcher
) -> dict | None:
    """The pipeline's ``args.stages`` for one seed, everything under ``outputs``; returns its summary, or ``None``
    when it stopped after sampling for people to rank (``--label people``).
    ``train_prompts``: the user's prompts to rank and train the policy on, ``None`` for fresh toy prompts;
    ``launch``: how each stage's command runs (``warm`` or ``in_new_process``).
    Each stage starts once what it reads exists, beside the others that can (``--jobs``)."""
    pipeline, stages, judge = outputs / "pipeline", args.stages, args.judge
    own_task = args.demonstrations is not None or train_prompts is not None  # else the toy run, its configs' steps
    train_path = None
    if train_prompts is not None:
        train_path = write_jsonl_atomic([{"prompt": p} for p in train_prompts], pipeline / "prompts.jsonl")
    best_by = RL_WATCHED[judge is not None] if own_task else None  # the toy run keeps its configs' last policy
    inputs = Run(
        args.configs,
        outputs,
        seed,
        max_steps=args.max_steps,
        train_prompts=train_path,
        best_by=best_by,
        ptx_texts=args.ptx_texts,
    )
    runner = StageRunner(args.jobs, pipeline / "logs", launch, Manifests(pipeline / "stages", args.restart))
    sft = export(inputs, "sft")

    # SFT on the demonstrations (on your task for passes over them, stopped early).
    per_pass = None
    if own_task and args.demonstrations and "sft" in stages:
        per_pass = steps_per_pass(args.configs / "sft.yaml", args.demonstrations, "demonstration")
    sft_command = sft_argv(inputs, args.demonstrations, args.model, per_pass, args.sft_passes, args.sft_lr)
    runner.together(asked({"sft": sft_command}, stages))
    if args.label == "people":  # samples for people to rank, and stop
        runner.together(samples(args, inputs, "samples", sft, 1, train_prompts, held_out)[1])
        return None

    # K samples a prompt from SFT, ranked by the judge (unless people ranked them: --comparisons), beside PPO
    # against the judge itself, which needs only SFT.
    comparisons, sampling = Path(args.comparisons or pipeline / "comparisons.jsonl"), {}
    if {"rm", "dpo"} & set(stages) and not args.comparisons:  # else nothing trains on the rankings
        comparisons, sampling = samples(args, inputs, "comparisons", sft, 1, train_prompts, held_out)
    runner.together(sampling, asked({"ppo_gold_reward": gold_reward_argv(inputs, sft, judge)}, stages))

    # The reward model on the rankings.
    per_pass = None
    if own_task and "rm" in stages:
        per_pass = steps_per_pass(args.configs / "rm.yaml", str(comparisons), "comparison")
    rm_command = rm_argv(inputs, sft, comparisons, args.demonstrations, per_pass, args.rm_passes)
    runner.together(asked({"rm": rm_command}, stages))

    # PPO, GRPO, RLOO against it (and PPO over-optimised), beside DPO on the same rankings.
    overoptimized = {"ppo_overoptimized": overoptimized_argv(inputs, sft, judge)} if args.overoptimization else {}
    dpo = asked({"dpo": dpo_argv(inputs, sft, comparisons)}, stages)
    runner.together(asked(against_rm_argv(inputs, sft, judge), stages), overoptimized, dpo)

    policies = {"sft": sft} | {name: export(inputs, name) for name in RL_CONFIGS if name in stages}
    reward_models = {"reward_model": export(inputs, "rm")} if export(inputs, "rm").is_dir() else {}
    if {"rm", "ppo"} <= set(stages):
        round_policies, round_reward_models = later_rounds(args, inputs, runner, comparisons, train_prompts, held_out)
        policies |= round_policies
        reward_models |= round_reward_models
    if "dpo" in stages:
        policies |= dpo_rounds(args, inputs, runner, train_prompts, held_out)
    policies |= {name: export(inputs, name) for name in ("ppo_gold_reward", "dpo") if name in stages}
    if args.overoptimization:
        policies["ppo_overoptimized"] = export(inputs, "ppo_overoptimized")

    # The evaluation on held-out prompts.
    return summarise(args, seed, outputs, held_out, policies, reward_models, runner.seconds)


def later_rounds(
    args: argparse.Namespace,
    inputs: Run,
    runner: StageRunner,
    first: Path,
    train_prompts: list | None,
    held_out: list,
) -> tuple[dict[str, Path], dict[str, Path]]:
    """Rounds 2 … ``--rounds`` of iterated RLHF: K samples of fresh prompts from the last round's PPO policy are
    ranked, the last round's reward model is fine-tuned on every comparison so far (``first``, round 1's, and each
    round's since), and PPO continues from the last policy (reference: SFT). Returns the rounds' policies and reward
    models by name."""
    sft, pipeline = export(inputs, "sft"), inputs.outputs / "pipeline"
    policies, reward_models = {}, {}
    last, last_rm, comparisons = export(inputs, "ppo"), export(inputs, "rm"), [first]
    for round_ in range(2, args.rounds + 1):
        round_comparisons, sampling = samples(
            args, inputs, f"comparisons_round{round_}", last, round_, train_prompts, held_out
        )
        runner.together(sampling)
        comparisons.append(round_comparisons)
        everything = write_jsonl_atomic(
            [json.loads(line) for path in comparisons for line in path.read_text().splitlines()],
            pipeline / f"comparisons_up_to_round{round_}.jsonl",
        )
        runner.together({f"rm_round{round_}": rm_round_argv(inputs, round_, last_rm, everything, args.demonstrations)})
        runner.together({f"ppo_round{round_}": ppo_round_argv(inputs, round_, last, sft, args.judge)})
        last, last_rm = export(inputs, f"ppo_round{round_}"), export(inputs, f"rm_round{round_}")
        policies[f"ppo_round{round_}"], reward_models[f"reward_model_round{round_}"] = last, last_rm
    return policies, reward_models


def dpo_rounds(
    args: argparse.Namespace, inputs: Run, runner: StageRunner, train_prompts: list | None, held_out: list
) -> dict[str, Path]:
    """Rounds 2 … ``--rounds`` of iterated DPO (Xiong et al. 2024): K samples of fresh prompts from the last round's
    DPO policy are ranked, and DPO continues from that policy on them, against the SFT model (``--dpo_reference
    sft``) or the last round's policy (``last``). Returns the rounds' policies by name."""
    sft, last, policies = export(inputs, "sft"), export(inputs, "dpo"), {}
    for round_ in range(2, args.rounds + 1):
        comparisons, sampling = samples(
            args, inputs, f"dpo_comparisons_round{round_}", last, round_, train_prompts, held_out
        )
        runner.together(sampling)
        reference = sft if args.dpo_reference == "sft" else last
        runner.together({f"dpo_round{round_}": dpo_round_argv(inputs, round_, last, reference, comparisons)})
        last = policies[f"dpo_round{round_}"] = export(inputs, f"dpo_round{round_}")
    return policies


def main(argv: list[str] | None = None, entry: Callable[[list[str]], None] | None = None) -> dict | None:
    """Runs the pipeline as ``argv`` asks; returns the summary, or ``None`` when it stopped for people to rank.
    ``entry``: the CLI's ``main``, for stages forked warm from this process (``None``: each stage a fresh process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    args.outputs = args.outputs.resolve()
    args.configs = args.configs.resolve()
    args.judge = args.judge or (GOLD if args.prompts is None else None)  # the toy's gold judge on the toy task
    reuse_sft = args.skip_sft or (args.comparisons is not None and (args.outputs / "sft" / "hf").is_dir())
    defaults = [stage for stage in DEFAULT_STAGES if args.judge or stage != "ppo_gold_reward"]
    stages = [stage for stage in args.stages or defaults if not (stage == "sft" and reuse_sft)]
    gpu = torch.cuda.is_available()
    if args.jobs is None:
        args.jobs = 1 if gpu else 2
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.rounds < 1 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--rounds must be >= 1 and --seeds distinct")
    error = (
        stage_error(stages, args.rounds, args.overoptimization, len(args.seeds), args.outputs)
        or labelling_error(args, stages)
        or ptx_error(args, stages)
        or configs_error(args.configs, stages, args.overoptimization)
    )
    if error:
        parser.error(error)
    args.stages = [stage for stage in STAGES if stage in stages]  # in the order they run
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
    held_out, train_prompts = held_out_and_train(args.prompts, args.held_out, args.eval_prompts)
    start = time.perf_counter()
    with stop_on_signals(["lightning-rlhf", "pipeline", *argv]):  # Ctrl-C: the line to resume, no stage left running
        if len(args.seeds) == 1:
            summary = run(args, args.seeds[0], outputs, held_out, train_prompts, launch)
        else:
            runs = [run(args, seed, outputs / f"seed{seed}", held_out, train_prompts, launch) for seed in args.seeds]
            summary = aggregate(runs)
    if summary is None:
        print(people_instructions(argv, outputs))
        return None
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(summary, outputs / "pipeline" / "summary.json")
    report(summary, args, outputs)
    return summary
