"""What every benchmark row shares: the initial model, timing, model FLOPs and MFU, peak memory, TRL's arguments and
the printed table.

A run compares rows (``Row``), each measured in its own process so that its peak memory is its own: the process is
``scripts/benchmark.py`` with the run's flags and the row's (``Row.flags``), and prints its row as one
``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_rlhf.training.flops import FORWARD_PASSES, forward_flops, matmul_params, peak_tflops

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmark.py"


@dataclasses.dataclass(frozen=True)
class Row:
    """One implementation at one setting: what one process of a run measures (``scripts/benchmark.py --row``)."""

    impl: str = "ours"  # ours | trl | naive (logprobs)
    estimator: str = "gae"  # ppo: the advantage estimator
    rollout_engine: str = "hf"  # ppo, generate: hf | vllm
    layout: str = "padded"  # sft: padded | packed; rm, dpo, ppo, generate: padded | shared
    cache: str = "dynamic"  # generate on hf: dynamic | static | static+compile
    adapter: str = "none"  # dpo: none | lora
    loss_type: str = "sigmoid"  # dpo: a DPOModule loss_type (simpo, orpo: no reference; kto: unpaired)

    def flags(self) -> list[str]:
        """The command-line flags that measure this row (``add_row_flags``)."""
        return [
            *("--row", self.impl, "--estimator", self.estimator, "--rollout-engine", self.rollout_engine),
            *("--layout", self.layout, "--cache", self.cache, "--adapter", self.adapter),
            *("--loss-type", self.loss_type),
        ]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Row:
        return cls(args.row, args.estimator, args.rollout_engine, args.layout, args.cache, args.adapter, args.loss_type)


ROW_FIELDS = ("row", "estimator", "rollout_engine", "layout", "cache", "adapter", "loss_type", "model_dir")


def add_row_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of one row: a run passes them to each process it starts; given by hand, they measure that row."""
    group = parser.add_argument_group(
        "one row",
        "measure a single row in this process and print it as a `RESULT {json}` line (a run starts one "
        "process per row with these)",
    )
    group.add_argument("--row", choices=["ours", "trl", "naive"], help="the implementation: ours, TRL's, naive")
    group.add_argument("--estimator", default="gae", help="ppo: this row's advantage estimator")
    group.add_argument("--loss-type", default="sigmoid", help="dpo: this row's DPOModule loss_type")
    group.add_argument("--rollout-engine", default="hf", choices=["hf", "vllm"], help="ppo, generate: who samples")
    group.add_argument(
        "--layout",
        default="padded",
        choices=["padded", "packed", "shared"],
        help="sft: padded or packed; rm, dpo, ppo, generate: padded or shared prompt (rows named `shared`)",
    )
    group.add_argument("--cache", default="dynamic", choices=["dynamic", "static", "static+compile"])
    group.add_argument("--adapter", default="none", choices=["none", "lora"], help="dpo: LoRA, adapter-off reference")
    group.add_argument("--model-dir", help="the initial weights (default: made in a temporary directory)")


def run_in_own_process(row: Row, model_dir: str) -> dict:
    """``row`` measured in a fresh process given this run's flags and the row's; the row it printed."""
    command = [sys.executable, str(BENCHMARK), *sys.argv[1:], *row.flags(), "--model-dir", model_dir]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode or not lines:
        raise SystemExit(f"{row.impl} failed:\n{child.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def export_random_llama(directory: Path, config: dict) -> str:
    """A Llama of ``config`` with seeded random weights and the byte-level tokenizer, exported to ``directory``."""
    from lightning_rlhf.data.tokenizer import load_tokenizer
    from lightning_rlhf.models.causal_lm import load_causal_lm
    from lightning_rlhf.models.export import export_pretrained

    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    return str(export_pretrained(load_causal_lm(None, tokenizer, "float32", config), tokenizer, directory))


def make_initial_model(args: argparse.Namespace, directory: Path) -> str:
    """The initial weights every row of a run loads: ``--hidden-size`` wide, ``--layers`` deep, 64-wide heads."""
    from lightning_rlhf.data.tokenizer import load_tokenizer

    heads = max(1, args.hidden_size // 64)
    config = {
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": max(512, args.max_length),
        "vocab_size": max(args.vocab_size, len(load_tokenizer(None))),
    }
    return export_random_llama(directory, config)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def start_timing(device: str) -> float:
    """Wait for the device, forget the peak memory of the warm-up, and return the time the timed steps start."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def model_flops(model, lengths: list[int], stage: str) -> float:
    """Model FLOPs of training ``stage`` on sequences of these real lengths (``lightning_rlhf.training.flops``)."""
    cfg = model.config
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return FORWARD_PASSES[stage] * forward_flops(matmul_params(model), cfg.num_hidden_layers, width, lengths)


def peak(args: argparse.Namespace) -> float | None:
    """Peak TFLOPS of the card for the dtype the benchmark computes in (``--peak-tflops`` overrides)."""
    if args.peak_tflops or args.device != "cuda":
        return args.peak_tflops
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return peak_tflops(torch.cuda.get_device_name(), getattr(torch, args.dtype), tf32)


def result(args: argparse.Namespace, name: str, tokens: int, seconds: float, flops: float) -> dict:
    """Throughput of the timed steps; MFU = model FLOPs per second / the card's peak for the dtype used."""
    out = {"impl": name, "tokens_per_s": tokens / seconds, "step_s": seconds / args.steps}
    out["peak_mem_mib"] = peak_memory_mib(args.device)
    if peak(args):
        out["mfu"] = flops / seconds / (peak(args) * 1e12)
    return out


def fit_lightning(
    args: argparse.Namespace, module, data, steps_per_batch: int = 1, losses: list | None = None
) -> tuple[float, list[int]]:
    """Train ``module`` for warmup + steps batches; seconds of the timed steps and the real lengths of the sequences
    they saw. ``steps_per_batch``: optimiser steps per batch (manual optimisation takes several). ``losses``: a list
    to append every step's training loss to."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class Timer(Callback):
        start, end = 0.0, 0.0
        lengths: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                self.start = start_timing(args.device)
            if batch_idx >= args.warmup:
                self.lengths += sequence_lengths(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(args.device)
            self.end = time.perf_counter()
            if losses is not None:
                losses.append(float(outputs["loss"]))

    timer = Timer()
    L.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=(args.warmup + args.steps) * steps_per_batch,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=tempfile.mkdtemp(),
    ).fit(module, data)
    return timer.end - timer.start, timer.lengths


def sequence_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Real lengths of a batch's sequences: its rows', or in a packed batch those of the sequences in its rows (each
    ends where the next position restarts at 0), or in a shared-prompt batch each prompt ⊕ response's (the position of
    the response's last token, plus one)."""
    if "reward_index" in batch:
        return (batch["position_ids"].flatten()[batch["reward_index"]] + 1).tolist()
    if "position_ids" not in batch:
        return batch["attention_mask"].sum(-1).tolist()
    positions = batch["position_ids"]
    ends = torch.nn.functional.pad(positions[:, 1:] == 0, (0, 1), value=True) & batch["attention_mask"].bool()
    return (positions[ends] + 1).tolist()


def train_hf(args: argparse.Namespace, trainer) -> float:
    """Run a ``transformers`` / TRL trainer for warmup + steps optimiser steps; seconds of the timed steps."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        start = end = 0.0

        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == args.warmup:
                self.start = start_timing(args.device)

        def on_step_end(self, targs, state, control, **kwargs):
            sync(args.device)
            self.end = time.perf_counter()

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.end - timer.start


def trl_args(args: argparse.Namespace) -> dict:
    """The TrainingArguments every TRL run shares: same steps, batch, length and precision as ours, no extras."""
    return {
        "output_dir": tempfile.mkdtemp(),
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.max_length,
        "max_steps": args.warmup + args.steps,
        "save_strategy": "no",
        "report_to": [],
        "logging_steps": 10_000,
        "use_cpu": args.device == "cpu",
        "seed": 0,
        "dataloader_num_workers": 0,
        "bf16": False,
        "fp16": False,
    }


def trl_name() -> str:
    return f"trl {__import__('trl').__version__}"


def adamw(lr: float):
    """The optimiser every row of ours trains with: AdamW at ``lr``, as a module's ``optimizer`` callable."""
    return lambda params: torch.optim.AdamW(params, lr=lr)


def print_table(rows: list[dict], key: str) -> None:
    """One line a row: its numbers, and ``key`` relative to the first row's (for ``step_s``, the first's time over
    this row's, so that above 1 is faster either way)."""
    base = rows[0]
    for row in rows:
        ratio = base[key] / row[key] if key == "step_s" else row[key] / base[key]
        extras = "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "impl" and isinstance(v, float))
        print(f"{row['impl']:34s} {extras}  ({key} relative to {base['impl']}: {ratio:.2f}x)")


def print_loss_difference(rows: list[dict], names: str) -> None:
    """The largest difference between the first two rows' losses at the same step (``names``: 'shared vs padded')."""
    difference = max(abs(a - b) for a, b in zip(rows[0]["losses"], rows[1]["losses"], strict=True))
    print(f"largest difference in the loss of a step, {names}: {difference:.3g}")
