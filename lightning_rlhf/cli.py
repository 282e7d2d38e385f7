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
    lightning-rlhf pipeline [--demonstrations … --prompts … --judge pkg.fn | --label people]   (the whole loop, each
        stage one of these commands, evaluated on held-out prompts; see pipeline.py)
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from lightning_rlhf.commands import evaluate, label, sample, score


class RLHFCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")


def pipeline(argv: list[str]) -> None:
    """``lightning-rlhf pipeline``, imported only when asked: it loads TensorBoard's event reader, which ``fit`` and
    the other subcommands do without."""
    from lightning_rlhf.commands.pipeline.loop import main as pipeline_main

    pipeline_main(argv, entry=main)  # its stages run the commands through this CLI


EXTRA_SUBCOMMANDS = {
    "score": score.main,
    "sample": sample.main,
    "evaluate": evaluate.main,
    "label": label.main,
    "pipeline": pipeline,
}


HELP = (
    "The InstructGPT pipeline as Lightning modules. LightningCLI subcommands below, plus: "
    "'lightning-rlhf sample --help' (K responses per prompt, optionally ranked by a simulated labeller), "
    "'lightning-rlhf label --help' (a web page where people rank them, and their agreement), "
    "'lightning-rlhf score --help' (rewards from an exported reward model), "
    "'lightning-rlhf evaluate --help' (win rates and Elo ratings between checkpoints, judged on held-out prompts) "
    "and 'lightning-rlhf pipeline --help' (the whole loop: SFT, sampling, ranking by a judge or people, reward "
    "model, PPO / GRPO / RLOO, DPO, evaluation). "
    "User errors (paths, data, settings) print one line and exit 1; --debug (or LIGHTNING_RLHF_DEBUG=1) shows the "
    "traceback. Beware: every class_path, and PPO's reward_fn / judge_fn, imports and runs the code it names."
)


# What a user can cause and fix (bad paths, data, settings): one line and exit status 1, not a traceback. Other
# exceptions are bugs of ours and keep their traceback. ``--debug`` (or LIGHTNING_RLHF_DEBUG=1) shows it anyway.
USER_ERRORS = (ValueError, OSError, MisconfigurationException)
DEBUG_HINT = "(add --debug, or set LIGHTNING_RLHF_DEBUG=1, for the full traceback)"


def next_in_chain(err: BaseException) -> BaseException | None:
    return err.__cause__ or (None if err.__suppress_context__ else err.__context__)


def user_error(err: BaseException) -> BaseException | None:
    """The innermost user error in ``err``'s chain: jsonargparse wraps a constructor's error in its own ValueError
    that dumps the whole config."""
    chain = [err]
    while (cause := next_in_chain(chain[-1])) is not None and cause not in chain:
        chain.append(cause)
    return next((e for e in reversed(chain) if isinstance(e, USER_ERRORS)), None)


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("LIGHTNING_RLHF_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        run(argv, from_command_line=args is None)
    except USER_ERRORS as err:
        if debug:
            raise
        cause = user_error(err)
        message = " ".join(str(cause).split()) or type(cause).__name__
        print(f"error: {message}\n{DEBUG_HINT}", file=sys.stderr)
        sys.exit(1)


DOTTED_PATH = re.compile(r"\blightning_rlhf(?:\.[A-Za-z_]\w*)+")


def resolves(path: str) -> bool:
    """Whether the dotted ``path`` names a module of ours or something in one."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            found = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if not (name == err.name or name.startswith(f"{err.name}.")):
                return True  # the module is there; one of its own imports is not (an optional extra)
            continue
        try:
            for attribute in parts[cut:]:
                found = getattr(found, attribute)
        except AttributeError:
            return False
        return True
    return False


def new_home(path: str) -> str | None:
    """Where the last name of an old ``path`` lives now: the module of that name, or the module that defines it."""
    import lightning_rlhf

    name = path.rpartition(".")[2]
    for info in pkgutil.walk_packages(lightning_rlhf.__path__, "lightning_rlhf."):
        if info.name.rpartition(".")[2] == name:
            return info.name
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        if name in vars(module) and getattr(vars(module)[name], "__module__", info.name) == info.name:
            return f"{info.name}.{name}"
    return None


def check_moved_paths(argv: list[str]) -> None:
    """Refuse a ``lightning_rlhf.…`` path (a ``class_path``, a ``reward_fn``) in ``argv`` or its ``--config`` files
    that no longer resolves, naming where the thing it named lives now (the package was laid out in layers)."""
    configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    configs += [arg.partition("=")[2] for arg in argv if arg.startswith("--config=")]
    sources = [("the command line", " ".join(argv))]
    sources += [(config, Path(config).read_text()) for config in configs if Path(config).is_file()]
    for where, text in sources:
        for path in dict.fromkeys(DOTTED_PATH.findall(text)):
            if not resolves(path):
                home = new_home(path)
                now = f"it is {home} now: update the path" if home else "nothing of that name exists now"
                raise ValueError(f"{where}: {path} does not exist (lightning_rlhf is laid out in layers); {now}")


def run(argv: list[str], from_command_line: bool = False) -> None:
    if argv and argv[0] in EXTRA_SUBCOMMANDS:
        EXTRA_SUBCOMMANDS[argv[0]](argv[1:])
        return
    check_moved_paths(argv)
    RLHFCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": HELP},
        args=None if from_command_line and argv == sys.argv[1:] else argv,
    )


if __name__ == "__main__":
    main()
