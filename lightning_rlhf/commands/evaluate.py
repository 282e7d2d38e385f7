"""Win rates and ratings between checkpoints: ``lightning-rlhf evaluate``.

    lightning-rlhf evaluate --models outputs/sft/hf outputs/ppo/hf outputs/dpo/hf --names sft ppo dpo \
        --toy_held_out 300 --judge gold --output outputs/evaluation

Each model answers every held-out prompt once (all sampled under the same seed); a judge scores the answers:
the toy task's gold judge, a function ``(prompt, response) -> float`` (``--reward_fn``) or a reward model
(``--reward_model``). From the ``(m, p)`` score matrix come the pairwise win rates (a tie counts half), each
model's win rate against a baseline (InstructGPT's headline number, Ouyang et al. 2022, figure 1), and
Bradley–Terry strengths fitted to all pairs at once (Hunter 2004), reported on the Elo scale as in Chatbot Arena
(Chiang et al. 2024). Confidence intervals come from resampling prompts (a percentile bootstrap).

Writes ``evaluation.json`` (the report of ``rating_report``) and ``win_rates.png`` into ``--output``.

Shapes: ``m`` models, ``p`` prompts, ``N`` samples per prompt, ``R`` bootstrap resamples.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_rlhf.data.records import read_records
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.environments import import_environment
from lightning_rlhf.evaluation.judges import import_reward_fn, make_scorer
from lightning_rlhf.evaluation.ratings import format_table, plot_win_rates, rating_report
from lightning_rlhf.io import save_figure_atomic, write_json_atomic
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.rl.engines import ENGINES, build_engine
from lightning_rlhf.rl.episodes import EpisodeOptions, run_episodes
from lightning_rlhf.rl.sampling import sample_and_judge
from lightning_rlhf.toy import make_prompts, toy_path


def evaluate_models(
    named_models: dict[str, str],
    prompts: list,
    judge: Callable[[str, str], float] | str = "gold",
    baseline: str | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = False,
    engine: str = "hf",
    environment: type | None = None,
    max_turns: int = 4,
    max_episode_tokens: int = 256,
) -> dict[str, Any]:
    """Sample one response per prompt from each model, judge them, and return ``rating_report`` of the scores; with an
    ``environment``, one episode per prompt record, scored by its reward.

    Args:
        named_models: name -> Hugging Face directory of a causal LM (e.g. ``{"sft": "outputs/sft/hf"}``); the
            first is the default baseline.
        prompts: prompt strings (or chat messages).
        judge: see ``make_scorer``.
        baseline: name of the model the win rates are against and whose Elo is 1000.
        temperature: of sampling; 0 decodes greedily.
        max_new_tokens: most tokens per response.
        seed: ``torch.manual_seed`` before each model's sampling (every model sees the same seed), and the
            bootstrap's seed.
        bootstrap: resamples for the confidence intervals (0: none).
        batch_size: prompts per generation (and reward-model) batch.
        device: where the models run.
        progress: show a bar (done/total, rate, time left) on stderr while each model samples and while a reward
            model judges.
        engine: what samples (``engines.ENGINES``): ``hf`` or ``vllm`` (one engine per model, built from its export).
        environment, max_turns, max_episode_tokens: an environment class (``lightning_rlhf.environments``) instead of
            a judge: ``prompts`` are then prompt records (what ``reset`` reads), each model plays one episode of each
            (``rl.episodes.run_episodes``; ``max_new_tokens`` per turn) and its score is the episode's reward.

    Returns:
        ``rating_report``'s keys, plus ``judge``, ``temperature``, ``max_new_tokens`` and ``seed``; with an
        environment, ``episodes``: each model's mean ``turns``, ``tool_calls``, ``tool_errors`` and ``truncated``.
    """
    for name, path in named_models.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model {name!r}: {path} is not a directory (a Hugging Face export)")
    if baseline is not None and baseline not in named_models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(named_models)}")
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    score = make_scorer(judge, batch_size, device, progress) if environment is None else None
    scores, episodes = [], {}
    options = EpisodeOptions(max_turns, max_new_tokens, max_episode_tokens, temperature)
    for name, path in named_models.items():
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, tokenizer).to(device)
        sampler = build_engine(engine, path, str(model.dtype).removeprefix("torch."))
        torch.manual_seed(seed)
        if environment is not None:
            rewards, episodes[name], _ = run_episodes(
                sampler, model, tokenizer, environment, prompts, options, batch_size
            )
            scores.append(rewards)
        else:
            _, judged = sample_and_judge(
                model,
                tokenizer,
                prompts,
                score,
                1,
                512,
                batch_size,
                progress,
                f"sampling {name}",
                sampler,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
            )
            scores.append([prompt_scores[0] for prompt_scores in judged])
        del model, sampler  # before loading the next one
    report = rating_report(list(named_models), scores, baseline, bootstrap, seed)
    judge_name = judge if isinstance(judge, str) else getattr(judge, "__qualname__", repr(judge))
    if environment is not None:
        report["episodes"], judge_name = episodes, f"{environment.__module__}.{environment.__qualname__}"
    return {**report, "judge": judge_name, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="lightning-rlhf evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="Hugging Face directories of the models")
    parser.add_argument("--names", nargs="+", default=None, help="one name per model (default: the paths)")
    parser.add_argument("--baseline", default=None, help="name of the model to compare against (default: first)")
    parser.add_argument("--prompts", default=None, help="prompt records (default: the shipped toy prompts)")
    parser.add_argument("--toy_held_out", type=int, default=None, help="N fresh toy prompts (seed 1234) instead")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--judge", choices=["gold"], default=None, help="the toy task's gold judge")
    parser.add_argument("--reward_fn", default=None, help="a function (prompt, response) -> float: package.module.fn")
    parser.add_argument("--reward_model", default=None, help="a reward model export directory")
    parser.add_argument(
        "--environment", default=None, help="an environment class (package.module.Class): episodes, scored by reward"
    )
    parser.add_argument("--max_turns", type=int, default=4, help="policy turns per episode (--environment)")
    parser.add_argument("--max_episode_tokens", type=int, default=256, help="tokens after the prompt (--environment)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 decodes greedily")
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="most tokens per response (default 32); per policy turn with --environment (default --max_episode_tokens)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the prompts for the intervals")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engine", default="hf", choices=list(ENGINES), help="what samples: transformers or vLLM")
    parser.add_argument("--output", required=True, help="directory for evaluation.json and win_rates.png")
    args = parser.parse_args(argv)

    judges = [j for j in (args.judge, args.reward_fn, args.reward_model, args.environment) if j is not None]
    if len(judges) != 1:
        parser.error(
            "give exactly one judge: --judge gold, --reward_fn package.module.fn, --reward_model DIR or --environment "
            "package.module.Class"
        )
    for path in [*args.models, *([args.reward_model] if args.reward_model else [])]:
        if not Path(path).is_dir():
            parser.error(f"{path}: no such directory (expected a Hugging Face export)")
    names = args.names or args.models
    if len(names) != len(args.models) or len(set(names)) != len(names):
        parser.error(f"--names must give {len(args.models)} distinct names, one per model; got {names}")
    if args.baseline is not None and args.baseline not in names:
        parser.error(f"--baseline {args.baseline!r} is not one of the names {names}")
    if args.environment is not None and args.prompts is None:
        parser.error("--environment needs --prompts: the records its reset reads (e.g. toy:tool_held_out)")
    if args.toy_held_out is not None and args.prompts is not None:
        parser.error("give --prompts or --toy_held_out, not both")
    try:
        judge = import_reward_fn(args.reward_fn) if args.reward_fn else judges[0]
        environment = import_environment(args.environment) if args.environment else None
    except ValueError as err:
        parser.error(str(err))

    if args.toy_held_out is not None:
        prompts = [record["prompt"] for record in make_prompts(args.toy_held_out, seed=1234)]
    else:
        records, _ = read_records(args.prompts or toy_path("prompts"), "prompt")
        prompts = [record.fields if environment else record.fields["prompt"] for record in records]
    prompts = prompts[: args.limit]
    if args.max_new_tokens is None:  # a turn is bounded by the episode's budget anyway
        args.max_new_tokens = args.max_episode_tokens if environment else 32
    report = evaluate_models(
        dict(zip(names, args.models, strict=True)),
        prompts,
        judge,
        args.baseline,
        args.temperature,
        args.max_new_tokens,
        args.seed,
        args.bootstrap,
        args.batch_size,
        args.device,
        progress=True,
        engine=args.engine,
        environment=environment,
        max_turns=args.max_turns,
        max_episode_tokens=args.max_episode_tokens,
    )
    if args.reward_fn:
        report["judge"] = args.reward_fn
    output = Path(args.output)
    write_json_atomic(report, output / "evaluation.json")
    save_figure_atomic(plot_win_rates(report), output / "win_rates.png")
    print(format_table(report))
    print(f"wrote {output / 'evaluation.json'} and {output / 'win_rates.png'}")
    return report
