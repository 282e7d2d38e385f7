"""``generate``: sampled tokens/s of our rollout generation (``engine.generate``, as PPO and ``sample`` call it), one
row per KV cache of ``--variants`` (and the vLLM engine with ``--engine vllm``); with ``--shared-prompt``, G =
``--num-generations`` rows of each prompt, each row prefilled vs each prompt prefilled once."""

from __future__ import annotations

import argparse
import time

import torch

from .common import Row, peak_memory_mib, start_timing, sync
from .data import prompts_path

VARIANTS = ("dynamic", "static", "static+compile")
CACHE_NAMES = {"dynamic": "dynamic cache", "static": "static cache", "static+compile": "static cache + compile"}


def plan(args: argparse.Namespace) -> list[Row]:
    if args.shared_prompt:  # G rows per prompt: each row prefilled, or each prompt once
        return [Row(layout="padded"), Row(layout="shared")]
    return [Row(cache=v) for v in args.variants] + ([Row(rollout_engine="vllm")] if args.engine == "vllm" else [])


def row_name(args: argparse.Namespace, row: Row, group: int) -> str:
    if row.rollout_engine == "vllm":
        return "vllm engine"
    if row.layout == "shared":
        return f"dynamic cache, a prompt prefilled once for {group} rows"
    if args.shared_prompt:
        return f"dynamic cache, each of a prompt's {group} rows prefilled"
    return CACHE_NAMES[row.cache]


def generate_options(args: argparse.Namespace, row: Row) -> dict:
    """``generate``'s keywords for this row: its cache (none for vLLM), or with ``--shared-prompt`` the dynamic
    cache with each prompt prefilled once (``shared`` row) or each row prefilled."""
    if args.shared_prompt:
        return {"cache_implementation": "dynamic", "share_prompts": row.layout == "shared"}
    if row.rollout_engine == "vllm":
        return {}
    cache, _, compiled = row.cache.partition("+")
    return {"cache_implementation": cache, "compile": compiled == "compile"}


def measure(args: argparse.Namespace, row: Row, model_dir: str) -> dict:
    """Sampled tokens/s of the row's engine and cache at temperature 1, the same model, prompts and seed in every
    row; ``warmup_s``: the warm-up steps (compilation included), ``startup_s``: building the engine."""
    from lightning_rlhf.data.collate import PromptCollator
    from lightning_rlhf.data.records import read_records
    from lightning_rlhf.data.tokenization import Tokenizer
    from lightning_rlhf.data.tokenizer import load_tokenizer
    from lightning_rlhf.models.causal_lm import load_causal_lm
    from lightning_rlhf.rl.engines import build_engine

    options = generate_options(args, row)
    group = args.num_generations if args.shared_prompt else 1
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer, args.dtype).to(args.device)
    startup = time.perf_counter()
    engine = build_engine(row.rollout_engine, model_dir, args.dtype)
    startup = time.perf_counter() - startup
    records, _ = read_records(prompts_path(args), "prompt")
    examples = Tokenizer(tokenizer, args.max_length).prompts(records)
    collate = PromptCollator(tokenizer.pad_token_id)
    torch.manual_seed(0)
    sampled, start = 0, time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            warmup_end = start_timing(args.device)
            warmup, start = warmup_end - start, warmup_end
        first = step * (args.batch_size // group) % len(examples)
        batch = collate([ex for ex in examples[first : first + args.batch_size // group] for _ in range(group)])
        rollout = engine.generate(
            model,
            tokenizer,
            batch["input_ids"].to(args.device),
            batch["attention_mask"].to(args.device),
            args.max_new_tokens,
            1.0,
            **options,
        )
        if step >= args.warmup:
            sampled += int(rollout.response_mask.sum())
    sync(args.device)
    seconds = time.perf_counter() - start
    return {
        "impl": f"lightning_rlhf generate, {row_name(args, row, group)}",
        "tokens_per_s": sampled / seconds,
        "step_s": seconds / args.steps,
        "warmup_s": warmup,
        "startup_s": startup,
        "sampled_tokens": sampled,
        "peak_mem_mib": peak_memory_mib(args.device),
    }
