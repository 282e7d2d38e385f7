"""``logprobs``: the log-prob hot path alone, ``token_logprobs`` against the naive ``log_softmax(...).gather`` and
TRL's ``selective_log_softmax``: median forward + backward time and the memory needed beyond the inputs."""

from __future__ import annotations

import argparse
import time

import torch

from .common import Row, current_memory_mib, peak_memory_mib, sync


def plan(args: argparse.Namespace) -> list[Row]:
    return [Row(), Row(impl="naive"), Row(impl="trl")]


def implementations() -> dict:
    from lightning_rlhf.losses.tokens import token_logprobs

    def naive(logits, tokens):
        return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)

    def trl(logits, tokens):
        from trl.trainer.utils import selective_log_softmax

        return selective_log_softmax(logits, tokens)

    return {
        "ours": ("lightning_rlhf token_logprobs", token_logprobs),
        "naive": ("log_softmax+gather", naive),
        "trl": ("trl selective_log_softmax", trl),
    }


def measure(args: argparse.Namespace, row: Row, model_dir: str) -> dict:
    """Median forward + backward time of the summed log-probs of (b, t) tokens under (b, t, v) logits."""
    name, fn = implementations()[row.impl]
    torch.manual_seed(0)
    logits = torch.randn(
        args.batch_size, args.seq_len, args.vocab, device=args.device, dtype=getattr(torch, args.dtype)
    )
    tokens = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), device=args.device)
    times, baseline = [], current_memory_mib(args.device)
    for i in range(args.warmup + args.steps):
        leaf = logits.clone().requires_grad_(True)
        if i == args.warmup and args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(args.device)
        start = time.perf_counter()
        fn(leaf, tokens).sum().backward()
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    extra = peak_memory_mib(args.device) - baseline  # beyond the inputs: the clone, activations, gradient
    return {"impl": name, "step_s": sorted(times)[len(times) // 2], "extra_mem_mib": extra}
