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
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lightning_rlhf.data.collate import PromptCollator
from lightning_rlhf.data.records import Record, check_output_file, read_records, write_jsonl_atomic
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.models import load_causal_lm, load_tokenizer
from lightning_rlhf.rollout import CACHE_IMPLEMENTATIONS, decode_responses, generate
from lightning_rlhf.scoring import Scorer, make_scorer
from lightning_rlhf.toy import make_prompts


@dataclass
class SampleReport:
    prompts: int = 0
    written: int = 0
    all_tied: int = 0
    merged_duplicates: int = 0
    empty: int = 0

    def summary(self) -> str:
        return (
            f"{self.written} of {self.prompts} prompts written; {self.all_tied} left out because all their responses "
            f"tied; {self.merged_duplicates} duplicate samples merged; {self.empty} empty responses left out"
        )


def sample_responses(
    model, tokenizer, prompts: list, k: int, max_length: int, batch_size: int, progress: bool = False, **generation
) -> list:
    """``k`` decoded responses for each prompt (strings or chat messages), in prompt order; ``progress`` shows a bar
    (responses done, responses/s, time left) on stderr."""
    records = [Record(f"prompt {i}", {"prompt": prompt}) for i, prompt in enumerate(prompts)]
    examples = Tokenizer(tokenizer, max_length).prompts(records)
    longest = max(len(ex["input_ids"]) for ex in examples) + generation.get("max_new_tokens", 0)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ValueError(
            f"the longest prompt + max_new_tokens is {longest} tokens, past the model's max_position_embeddings="
            f"{limit}: lower --max_new_tokens or --max_length"
        )
    collate = PromptCollator(tokenizer.pad_token_id)
    repeated = [ex for ex in examples for _ in range(k)]
    texts: list[str] = []
    device = next(model.parameters()).device
    with tqdm(total=len(repeated), desc="sampling", unit="response", disable=not progress) as bar:
        for start in range(0, len(repeated), batch_size):
            batch = collate(repeated[start : start + batch_size])
            rollout = generate(
                model, tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device), **generation
            )
            texts += decode_responses(tokenizer, rollout)
            bar.update(len(rollout.sequences))
    return [texts[i * k : (i + 1) * k] for i in range(len(examples))]


def rank(scores: list[float]) -> list[int]:
    """Dense ranks, 0 for the highest score; equal scores share a rank."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def judge_records(prompts: list, samples: list[list[str]], judge: Scorer, noise: float, seed: int):
    """Comparison records ranked by ``judge`` + N(0, noise²); returns the records and a ``SampleReport``.

    ``judge`` scores a batch of (prompt, response) pairs (``scoring.make_scorer`` makes one of ``"gold"``, a
    reward-model directory or a function); all distinct responses go to it in one call.
    """
    rng = random.Random(seed)
    report = SampleReport(prompts=len(prompts))
    # An empty response is not a valid comparison entry: left out and counted, as duplicates are merged and counted.
    unique = [[r for r in dict.fromkeys(responses) if r] for responses in samples]
    report.empty = sum(not r for responses in samples for r in responses)
    report.merged_duplicates = sum(len(r) - len(u) for r, u in zip(samples, unique, strict=True)) - report.empty
    pairs = [(prompt, r) for prompt, responses in zip(prompts, unique, strict=True) for r in responses]
    flat_scores = iter(judge([p for p, _ in pairs], [r for _, r in pairs]) if pairs else [])
    records = []
    for prompt, responses in zip(prompts, unique, strict=True):
        scores = [next(flat_scores) + (rng.gauss(0, noise) if noise else 0.0) for _ in responses]
        ranks = rank(scores)
        if len(set(ranks)) < 2:
            report.all_tied += 1
            continue
        records.append({"prompt": prompt, "responses": responses, "ranks": ranks})
    report.written = len(records)
    return records, report


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
    parser.add_argument("--output", required=True, help="JSON Lines file to write")
    parser.add_argument("--k", type=int, default=4, help="responses per prompt")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=512, help="most prompt tokens")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--cache_implementation", default="dynamic", choices=CACHE_IMPLEMENTATIONS, help="KV cache of generation"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (needs --cache_implementation static)"
    )
    parser.add_argument(
        "--judge",
        default=None,
        help="rank with a simulated labeller: gold (the toy task), a reward-model directory, or package.module.fn "
        "naming a function (prompt, response) -> float",
    )
    parser.add_argument("--noise", type=float, default=0.0, help="std of the labeller's noise on judge scores")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.compile and args.cache_implementation != "static":
        parser.error("--compile needs --cache_implementation static")
    if args.k < 2 and args.judge:
        parser.error("--k must be at least 2 to rank responses")
    for name, ok, allowed in [
        ("k", args.k >= 1, ">= 1"), ("batch_size", args.batch_size >= 1, ">= 1"),
        ("max_new_tokens", args.max_new_tokens >= 1, ">= 1"), ("temperature", args.temperature >= 0, ">= 0"),
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"), ("noise", args.noise >= 0, ">= 0"),
    ]:  # fmt: skip
        if not ok:
            parser.error(f"--{name}={getattr(args, name)}: must be {allowed}")

    check_output_file(args.output)
    # Built first, so that a judge that cannot be found fails before the sampling.
    judge = make_scorer(args.judge, args.batch_size, progress=True) if args.judge else None
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, tokenizer)
    if args.toy_prompts is not None:
        prompts = [r["prompt"] for r in make_prompts(args.toy_prompts, seed=10_000 + args.seed)][: args.limit]
    else:
        records, _ = read_records(args.prompts, "prompt")
        prompts = [r.fields["prompt"] for r in records[: args.limit]]
    samples = sample_responses(
        model, tokenizer, prompts, args.k, args.max_length, args.batch_size,
        progress=True, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        cache_implementation=args.cache_implementation, compile=args.compile,
    )  # fmt: skip
    if args.judge:
        out, report = judge_records(prompts, samples, judge, args.noise, args.seed)
    else:
        out = [{"prompt": p, "responses": [r for r in s if r]} for p, s in zip(prompts, samples, strict=True)]
        report = SampleReport(prompts=len(prompts), written=len(out), empty=sum(not r for s in samples for r in s))
    write_jsonl_atomic(out, args.output)
    print(f"{args.output}: {report.summary()}")
    return report
