"""The command line of ``scripts/benchmark.py``: a stage's rows, each measured in its own process, then printed as
JSON and as a table of ratios to the first row."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_rlhf.io import atomic_file

from . import dpo, generate, logprobs, ppo, rm, sft
from .common import ROW_FIELDS, Row, add_row_flags, make_initial_model, print_table, run_in_own_process


@dataclasses.dataclass(frozen=True)
class Stage:
    """A benchmark: the rows a run compares (``plan``), how one row is measured (``measure``), the column the table
    compares them by, and what it prints after the table (``report``)."""

    plan: Callable[[argparse.Namespace], list[Row]]
    measure: Callable[[argparse.Namespace, Row, str], dict]
    key: str = "tokens_per_s"
    report: Callable[[argparse.Namespace, list[dict]], None] | None = None
    needs_model: bool = True  # False: the rows build their own inputs, no initial model


STAGES = {
    "sft": Stage(sft.plan, sft.measure, report=sft.report),
    "rm": Stage(rm.plan, rm.measure, report=rm.report),
    "dpo": Stage(dpo.plan, dpo.measure, report=dpo.report),
    "ppo": Stage(ppo.plan, ppo.measure, key="episodes_per_s"),
    "generate": Stage(generate.plan, generate.measure),
    "logprobs": Stage(logprobs.plan, logprobs.measure, key="step_s", needs_model=False),
}
SHARED_PROMPT_STAGES = ("rm", "dpo", "ppo", "generate")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64, help="ppo, generate: tokens sampled per response")
    p.add_argument("--json", metavar="PATH", help="also write the result rows to PATH as a JSON list")
    model = p.add_argument_group("the model (random initial weights, saved once, loaded by every row)")
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--vocab-size", type=int, default=0, help="model vocabulary (default: the tokenizer's 259)")
    model.add_argument(
        "--peak-tflops", type=float, default=None, help="for MFU; default on CUDA: the card's dense peak for --dtype"
    )
    data = p.add_argument_group("the data")
    data.add_argument("--synthetic", action="store_true", help="random records as long as --max-length")
    data.add_argument(
        "--mixed-lengths", action="store_true", help="sft: the toy demonstrations and as many random ones of 10-500"
    )
    data.add_argument(
        "--prompt-length", type=int, default=0, help="synthetic prompts of this many tokens (0: the toy prompts)"
    )
    rows = p.add_argument_group("the rows a run compares")
    rows.add_argument("--packing", action="store_true", help="sft: ours padded and packed, instead of ours and TRL")
    rows.add_argument(
        "--lora", action="store_true", help="dpo: also our DPO with LoRA and the adapter-off reference, in the same run"
    )
    rows.add_argument("--lora-rank", type=int, default=8)
    rows.add_argument(
        "--reference-free",
        action="store_true",
        help="dpo: also our SimPO and ORPO (no reference model), in the same run, with their peak memory",
    )
    rows.add_argument(
        "--kto",
        action="store_true",
        help="dpo: also our KTO on the same pairs read as unpaired records, in the same run, with its peak memory",
    )
    rows.add_argument(
        "--shared-prompt",
        action="store_true",
        help="rm, dpo, ppo, generate: ours padded and in the shared-prompt layout (rows named `shared`)",
    )
    rows.add_argument(
        "--num-generations", type=int, default=4, help="ppo: G of the group estimators; --shared-prompt: K per prompt"
    )
    rows.add_argument(
        "--row-length", type=int, default=None, help="rm, dpo --shared-prompt: tokens per shared row (--max-length)"
    )
    rows.add_argument(
        "--estimators",
        nargs="+",
        default=["gae"],
        choices=["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"],
        help="ppo: advantage estimators compared in one run, each in its own process",
    )
    rows.add_argument(
        "--variants",
        nargs="+",
        default=list(generate.VARIANTS),
        choices=generate.VARIANTS,
        help="generate: KV cache variants compared in one run, each in its own process",
    )
    rows.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="generate, ppo: vllm adds rows sampled by the vLLM engine beside the hf ones",
    )
    log = p.add_argument_group("logprobs")
    log.add_argument("--seq-len", type=int, default=512)
    log.add_argument("--vocab", type=int, default=32000)
    add_row_flags(p)
    return p


def measure_row(args: argparse.Namespace, stage: Stage) -> None:
    """``--row``: the one row the flags name, measured here, printed as a ``RESULT`` line."""
    with tempfile.TemporaryDirectory() as tmp:
        if stage.needs_model and not args.model_dir:
            args.model_dir = make_initial_model(args, Path(tmp) / "init")
        print("RESULT " + json.dumps(stage.measure(args, Row.from_args(args), args.model_dir)))


def main(description: str) -> None:
    p = parser(description)
    args = p.parse_args()
    if (args.lora or args.reference_free or args.kto) and args.stage != "dpo":
        p.error("--lora, --reference-free and --kto are for the dpo benchmark")
    if args.shared_prompt and args.stage not in SHARED_PROMPT_STAGES:
        p.error(f"--shared-prompt is for the {', '.join(SHARED_PROMPT_STAGES)} benchmarks")
    stage = STAGES[args.stage]
    if args.row:
        return measure_row(args, stage)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_initial_model(args, Path(tmp) / "init") if stage.needs_model else ""
        rows = []
        for row in stage.plan(args):
            if row.impl == "trl" and importlib.util.find_spec("trl") is None:
                print("trl not installed: no TRL comparison (pip install trl)", file=sys.stderr)
                continue
            rows.append(run_in_own_process(row, model_dir))
    shape = {k: v for k, v in vars(args).items() if k not in ROW_FIELDS}
    print(json.dumps({"shape": shape, "results": rows}, indent=1, default=str))
    print_table(rows, stage.key)
    if stage.report:
        stage.report(args, rows)
    if args.json:
        with atomic_file(args.json) as out:
            json.dump(rows, out, indent=1)
