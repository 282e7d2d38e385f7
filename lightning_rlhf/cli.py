"""``lightning-rlhf``: LightningCLI over the stage modules and DataModules.

    lightning-rlhf fit --config configs/sft.yaml [--trainer.max_steps 100] [--model.init_args.dtype bfloat16]

Any ``LightningModule`` / ``LightningDataModule`` can be named by ``class_path``; the model's
``model_name_or_path`` is shared with the DataModule's tokenizer, so the two always agree.

Extra subcommands, outside LightningCLI:

    lightning-rlhf score --model outputs/rm/hf --input records.jsonl --output scored.jsonl   (see scoring.py)
    lightning-rlhf sample --model outputs/sft/hf --k 4 --judge gold --output comparisons.jsonl   (see sampling.py)
    lightning-rlhf evaluate --models outputs/sft/hf outputs/dpo/hf --names sft dpo --judge gold --output outputs/eval
        (win rates, Bradley-Terry / Elo ratings with bootstrap intervals; see evaluation.py)
    lightning-rlhf label --input samples.jsonl --output labels.jsonl   (people rank the samples; see label/)
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_rlhf import evaluation, label, sampling, scoring


class RLHFCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")


EXTRA_SUBCOMMANDS = {"score": scoring.main, "sample": sampling.main, "evaluate": evaluation.main, "label": label.main}


HELP = (
    "The InstructGPT pipeline as Lightning modules. LightningCLI subcommands below, plus: "
    "'lightning-rlhf sample --help' (K responses per prompt, optionally ranked by a simulated labeller), "
    "'lightning-rlhf label --help' (a web page where people rank them, and their agreement), "
    "'lightning-rlhf score --help' (rewards from an exported reward model) and "
    "'lightning-rlhf evaluate --help' (win rates and Elo ratings between checkpoints, judged on held-out prompts)."
)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in EXTRA_SUBCOMMANDS:
        EXTRA_SUBCOMMANDS[argv[0]](argv[1:])
        return
    RLHFCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": HELP},
        args=args,
    )


if __name__ == "__main__":
    main()
