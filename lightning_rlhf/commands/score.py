"""Scoring prompt/response records with a trained reward model: ``lightning-rlhf score``.

    lightning-rlhf score --model outputs/rm/hf --input responses.jsonl --output scored.jsonl

Reads ``{"prompt", "response"}`` records (any source ``read_records`` reads; ``--columns`` remaps names; an empty
response is one, scored as the prompt followed by EOS at once), scores each prompt ⊕ response ⊕ EOS with
``reward.sequence_rewards`` (the stored ``reward_offset`` subtracted unless ``--raw``) and writes the records
with a ``reward`` field as JSON Lines, in input order, as they are scored: to ``OUTPUT.partial``, renamed over the
output when complete (``data.resumable``). An interrupted run keeps what it finished, and a rerun with the same
arguments continues it (``--restart`` starts over).

``import_reward_fn`` resolves PPO's ``reward_fn``: a function ``(prompt, response) -> float`` used instead of a
reward model. ``make_scorer`` makes one batch scorer of any judge (the toy's gold judge, a reward-model export, such a
function): ``sample --judge`` ranks with it and ``evaluate`` rates with it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from lightning_rlhf.data.records import read_records
from lightning_rlhf.data.resumable import ResumableJsonl, digest, fingerprint
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.evaluation.judges import score_batches
from lightning_rlhf.io import check_output_file
from lightning_rlhf.models.reward import load_reward_model

CHUNK_BATCHES = 32  # batches scored (sorted by length among themselves) and written together


def score_file(
    model_dir: str,
    input_path: str,
    output_path: str,
    batch_size: int = 32,
    max_length: int = 512,
    raw: bool = False,
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    restart: bool = False,
) -> Path:
    """Score the records of ``input_path`` with the reward model exported at ``model_dir``; see module docstring.
    With ``skip_invalid``, invalid records and records whose prompt exceeds ``max_length`` are left out, counted.

    Records are scored ``CHUNK_BATCHES`` batches at a time (formed by length within a chunk) and each chunk's rows
    are written, in input order, as it finishes (``ResumableJsonl``): a rerun with the same settings after an
    interruption continues with the first chunk not written; ``restart`` discards what such a run wrote."""
    check_output_file(output_path)
    tokenizer = load_tokenizer(model_dir)
    model = load_reward_model(model_dir, tokenizer, dtype).eval().requires_grad_(False).to(device)
    records, report = read_records(input_path, "scored", columns, skip_invalid)  # an empty response scores too
    settings = {
        "command": "score",
        "model": fingerprint(model_dir),
        "records": digest([r.fields for r in records]),
        "batch_size": batch_size,
        "max_length": max_length,
        "raw": raw,
        "skip_invalid": skip_invalid,
        "dtype": dtype,
    }
    chunk = CHUNK_BATCHES * batch_size
    with ResumableJsonl(output_path, settings, restart) as out:
        too_long = out.counts.get("too_long", 0)
        if out.done:
            print(f"{out.records_path}: continuing after {out.done} of {len(records)} records", file=sys.stderr)
        with tqdm(total=len(records), initial=out.done, desc="scoring", unit="record") as bar:
            for start in range(out.done, len(records), chunk):
                part = records[start : start + chunk]
                rewards: list[float | None] = [None] * len(part)
                for positions, scores in score_batches(
                    model, tokenizer, part, batch_size, max_length, not raw, skip_invalid
                ):
                    for i, score in zip(positions, scores, strict=True):
                        rewards[i] = score
                    bar.update(len(positions))
                rows = [{**r.fields, "reward": x} for r, x in zip(part, rewards, strict=True) if x is not None]
                too_long += len(part) - len(rows)
                out.append(rows, start + len(part), {"too_long": too_long})
        path = out.finish()
    if report.skipped or too_long:
        print(f"{report.summary()}; {too_long} records with prompts over max_length={max_length} skipped")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-rlhf score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="reward model directory (RewardModule's export_dir)")
    parser.add_argument("--input", required=True, help="prompt/response records: .jsonl, .json, .parquet, dataset")
    parser.add_argument("--output", required=True, help="JSON Lines file to write (replaced atomically)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=512, help="most tokens of prompt + response")
    parser.add_argument("--raw", action="store_true", help="do not subtract the stored reward_offset")
    parser.add_argument("--columns", type=json.loads, default=None, help='e.g. \'{"prompt": "question"}\'')
    parser.add_argument("--skip_invalid", action="store_true", help="skip (and count) invalid records")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--restart", action="store_true", help="discard an interrupted run's results, start over")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    path = score_file(
        args.model,
        args.input,
        args.output,
        args.batch_size,
        args.max_length,
        args.raw,
        args.columns,
        args.skip_invalid,
        args.device,
        args.dtype,
        args.restart,
    )
    print(f"wrote {path}")
