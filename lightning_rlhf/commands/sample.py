"""The `sample` step: K responses per prompt from a model, for people (or a simulated labeller) to rank.

    lightning-rlhf sample --model outputs/sft/hf --k 4 --output outputs/samples.jsonl               # to rank by hand
    lightning-rlhf sample --model outputs/sft/hf --k 4 --judge gold --output outputs/comparisons.jsonl
    lightning-rlhf sample --model outputs/sft/hf --k 4 --judge outputs/rm/hf --output outputs/comparisons.jsonl

Without a judge each record is ``{"prompt", "responses"}``: add ``"ranks"`` (0 best, ties equal) and it is a
comparison record. With ``--judge`` a simulated labeller ranks them (AlpacaFarm-style simulated annotators): the
judge's score plus Gaussian noise of scale ``--noise``. The judge is ``gold`` (the embedded toy task's gold judge),
a reward-model export directory (its rewards, as ``score`` gives them) or the import path of any function
``(prompt, response) -> float`` (``package.module.fn``; a chat prompt reaches it as JSON). Identical samples are
merged, and prompts whose responses all tie are left out and counted, never dropped silently.

Records are written as each batch of prompts finishes, to ``OUTPUT.partial``, renamed to ``OUTPUT`` when all are
done (``data.resumable``). An interrupted run (Ctrl-C, a crash, ``kill -9``) keeps what it finished, and the same
command continues it and writes what an uninterrupted run would have: every batch has its own seed, from ``--seed``
and its first prompt, for the sampling and the labeller's noise alike. A partial file made with other arguments is
refused; ``--restart`` discards it.

With ``--environment package.module.Class`` (``lightning_rlhf.environments``; e.g. ``lightning_rlhf.toy.ToolEnv`` on
``--prompts toy:tool_prompts``) each prompt record starts K episodes instead, ranked by the environment's reward
(plus ``--noise``): a response is the episode after the prompt as text, the policy's turns and the environment's
as the chat template writes them.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import asdict, astuple, dataclass

import torch
from tqdm import tqdm

from lightning_rlhf.data.records import read_records
from lightning_rlhf.data.resumable import ResumableJsonl, digest, fingerprint
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.environments import import_environment
from lightning_rlhf.evaluation.judges import Scorer, make_scorer
from lightning_rlhf.evaluation.ratings import rank
from lightning_rlhf.io import check_output_file
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.rl.engines import ENGINES, build_engine
from lightning_rlhf.rl.episodes import EpisodeOptions, run_episodes
from lightning_rlhf.rl.generation import CACHE_IMPLEMENTATIONS
from lightning_rlhf.rl.sampling import batch_seed, judge_samples, sample_batches
from lightning_rlhf.toy import make_prompts


@dataclass
class SampleReport:
    prompts: int = 0
    written: int = 0
    all_tied: int = 0
    merged_duplicates: int = 0
    empty: int = 0  # samples that ended at once (EOS first): kept, ranked like any other

    def __add__(self, other: SampleReport) -> SampleReport:
        return SampleReport(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def summary(self, ranked: bool = True) -> str:
        """What was written; unranked samples (no judge) are neither tied nor merged, so only the counts that apply."""
        if not ranked:
            return f"{self.written} of {self.prompts} prompts written, unranked; {self.empty} empty responses (kept)"
        return (
            f"{self.written} of {self.prompts} prompts written; {self.all_tied} left out because all their responses "
            f"tied; {self.merged_duplicates} duplicate samples merged; {self.empty} empty responses (kept)"
        )


def judge_records(prompts: list, samples: list[list[str]], judge: Scorer, noise: float, seed: int):
    """Comparison records ranked by ``judge`` + N(0, noise²); returns the records and a ``SampleReport``.

    ``judge`` scores a batch of (prompt, response) pairs (``judges.make_scorer`` makes one of ``"gold"``, a
    reward-model directory or a function); all distinct responses go to it in one call (``sampling.judge_samples``).
    """
    unique = [list(dict.fromkeys(responses)) for responses in samples]
    return rank_records(prompts, samples, unique, judge_samples(prompts, unique, judge), noise, seed)


def episode_records(prompts: list, samples: list[list[str]], rewards: list[list[float]], noise: float, seed: int):
    """``judge_records`` for episodes already scored by their environment: ``rewards[i][j]`` of ``samples[i][j]``;
    identical episodes are merged, the first one's reward kept."""
    merged = []
    for texts, scores in zip(samples, rewards, strict=True):
        first: dict[str, float] = {}
        for text, reward in zip(texts, scores, strict=True):
            first.setdefault(text, reward)
        merged.append(first)
    return rank_records(prompts, samples, [list(m) for m in merged], [list(m.values()) for m in merged], noise, seed)


def rank_records(
    prompts: list, samples: list[list[str]], unique: list[list[str]], scores: list[list[float]], noise: float, seed: int
):
    """Records of each prompt's distinct responses ``unique`` (of ``samples``), ranked by ``scores`` + N(0, noise²)
    under ``seed``; a prompt whose responses all tie is left out and counted."""
    rng = random.Random(seed)
    report = SampleReport(prompts=len(prompts))
    # An empty response (EOS at once) is a response: ranked like any other, so that a reward model learns its score.
    report.empty = sum(not r for responses in samples for r in responses)
    report.merged_duplicates = sum(len(r) - len(u) for r, u in zip(samples, unique, strict=True))
    records = []
    for prompt, responses, judged in zip(prompts, unique, scores, strict=True):
        ranks = rank([score + (rng.gauss(0, noise) if noise else 0.0) for score in judged])
        if len(set(ranks)) < 2:
            report.all_tied += 1
            continue
        records.append({"prompt": prompt, "responses": responses, "ranks": ranks})
    report.written = len(records)
    return records, report


def unranked_records(prompts: list, samples: list[list[str]]) -> tuple[list[dict], SampleReport]:
    """``{"prompt", "responses"}`` records for people to rank, empty responses kept (and counted)."""
    records = [{"prompt": p, "responses": list(s)} for p, s in zip(prompts, samples, strict=True)]
    empty = sum(not r for s in samples for r in s)
    return records, SampleReport(prompts=len(prompts), written=len(records), empty=empty)


def episode_batches(model, tokenizer, engine, environment: type, records: list, args, options, start: int):
    """``sampling.sample_batches`` for episodes: ``args.k`` episodes of each record from ``start`` on, by batches of
    whole records, each under ``batch_seed``; yields ``(first, texts, rewards)``, ``k`` of each per record."""
    per_batch, k = max(1, args.batch_size // args.k), args.k
    for first in range(start, len(records), per_batch):
        torch.manual_seed(batch_seed(args.seed, first))
        repeated = [record for record in records[first : first + per_batch] for _ in range(k)]
        rewards, _, texts = run_episodes(engine, model, tokenizer, environment, repeated, options, len(repeated))
        yield (
            first,
            [texts[i : i + k] for i in range(0, len(texts), k)],
            [rewards[i : i + k] for i in range(0, len(rewards), k)],
        )


def main(argv: list[str] | None = None) -> SampleReport:
    parser = argparse.ArgumentParser(prog="lightning-rlhf sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face directory (e.g. the SFT export)")
    parser.add_argument("--prompts", default="toy:prompts", help="prompt records (default: the toy prompts)")
    parser.add_argument(
        "--toy_prompts",
        type=int,
        default=None,
        help="instead of --prompts, N fresh toy prompts drawn with --seed (a reward model needs many)",
    )
    parser.add_argument("--output", required=True, help="JSON Lines file to write (continued if interrupted)")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="most tokens per response (default 32); per policy turn with --environment (default --max_episode_tokens)",
    )
    parser.add_argument("--max_length", type=int, default=512, help="most prompt tokens")
    parser.add_argument("--batch_size", type=int, default=64, help="responses per batch, in whole prompts (>= 1)")
    parser.add_argument(
        "--cache_implementation", default="dynamic", choices=CACHE_IMPLEMENTATIONS, help="KV cache of generation"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (needs --cache_implementation static)"
    )
    parser.add_argument("--engine", default="hf", choices=list(ENGINES), help="what samples: transformers or vLLM")
    parser.add_argument(
        "--judge",
        default=None,
        help="rank with a simulated labeller: gold (the toy task), a reward-model directory, or package.module.fn "
        "naming a function (prompt, response) -> float",
    )
    parser.add_argument(
        "--environment", default=None, help="an environment class (package.module.Class): K episodes, ranked by reward"
    )
    parser.add_argument("--max_turns", type=int, default=4, help="policy turns per episode (--environment)")
    parser.add_argument("--max_episode_tokens", type=int, default=256, help="tokens after the prompt (--environment)")
    parser.add_argument("--noise", type=float, default=0.0, help="std of the labeller's noise on judge scores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", action="store_true", help="discard an interrupted run's results, start over")
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:  # a turn is bounded by the episode's budget anyway
        args.max_new_tokens = args.max_episode_tokens if args.environment else 32
    if args.compile and args.cache_implementation != "static":
        parser.error("--compile needs --cache_implementation static")
    if args.engine != "hf" and (args.compile or args.cache_implementation != "dynamic"):
        parser.error(f"--compile and --cache_implementation are the hf engine's; --engine {args.engine} has its own")
    if args.k < 2 and (args.judge or args.environment):
        parser.error("--k must be at least 2 to rank responses")
    if args.environment and (args.judge or args.toy_prompts is not None or args.engine != "hf"):
        parser.error(
            "--environment ranks by its own reward on --prompts records, with the hf engine: drop --judge, "
            "--toy_prompts and --engine"
        )
    for name, ok, allowed in [
        ("k", args.k >= 1, ">= 1"),
        ("batch_size", args.batch_size >= 1, ">= 1"),
        ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"),
        ("temperature", args.temperature >= 0, ">= 0"),
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("noise", args.noise >= 0, ">= 0"),
    ]:
        if not ok:
            parser.error(f"--{name}={getattr(args, name)}: must be {allowed}")

    check_output_file(args.output)
    # Built first, so that a judge that cannot be found fails before the sampling; no bar of its own: it judges a
    # batch at a time, under the sampling bar.
    judge = make_scorer(args.judge, args.batch_size) if args.judge else None
    try:
        environment = import_environment(args.environment) if args.environment else None
    except ValueError as err:
        parser.error(str(err))
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, tokenizer)
    engine = build_engine(args.engine, args.model, str(model.dtype).removeprefix("torch."))
    if args.toy_prompts is not None:
        prompts = [r["prompt"] for r in make_prompts(args.toy_prompts, seed=10_000 + args.seed)][: args.limit]
    else:
        records, _ = read_records(args.prompts, "prompt")
        prompts = [r.fields["prompt"] for r in records[: args.limit]]
        fields = [r.fields for r in records[: args.limit]]
    settings = {
        "command": "sample",
        "model": fingerprint(args.model),
        "prompts": digest(prompts),
        "judge": fingerprint(args.judge),
        "environment": args.environment and [args.environment, args.max_turns, args.max_episode_tokens],
        **{
            name: getattr(args, name)
            for name in (
                "k",
                "temperature",
                "top_p",
                "max_new_tokens",
                "max_length",
                "batch_size",
                "noise",
                "seed",
                "cache_implementation",
                "engine",
            )
        },
    }
    with ResumableJsonl(args.output, settings, args.restart) as out:
        report = SampleReport(**out.counts)
        if out.done:
            print(f"{out.records_path}: continuing after {out.done} of {len(prompts)} prompts", file=sys.stderr)
        if environment is not None:
            options = EpisodeOptions(args.max_turns, args.max_new_tokens, args.max_episode_tokens, args.temperature)
            batches = episode_batches(model, tokenizer, engine, environment, fields, args, options, out.done)
        else:
            batches = sample_batches(
                model,
                tokenizer,
                prompts,
                args.k,
                args.max_length,
                args.batch_size,
                args.seed,
                out.done,
                engine,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                cache_implementation=args.cache_implementation,
                compile=args.compile,
            )
        total = len(prompts) * args.k
        with tqdm(total=total, initial=out.done * args.k, desc="sampling", unit="response") as bar:
            for first, samples, *rewards in batches:
                batch_prompts, seed = prompts[first : first + len(samples)], batch_seed(args.seed, first)
                if rewards:  # episodes, scored by their environment; the labeller's noise seeded per batch too
                    rows, batch_report = episode_records(batch_prompts, samples, rewards[0], args.noise, seed)
                elif judge:
                    rows, batch_report = judge_records(batch_prompts, samples, judge, args.noise, seed)
                else:
                    rows, batch_report = unranked_records(batch_prompts, samples)
                report += batch_report
                out.append(rows, first + len(samples), asdict(report))
                bar.update(len(samples) * args.k)
        out.finish()
    print(f"{args.output}: {report.summary(ranked=judge is not None or environment is not None)}")
    return report
