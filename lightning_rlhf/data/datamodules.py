"""DataModules for demonstrations (SFT), comparisons (reward model, DPO), unpaired feedback (KTO) and prompts (PPO,
sampling).

Each reads records (``records.py``), tokenizes them under one truncation policy (``tokenization.py``) into a
memory-mapped Arrow dataset cached on disk (``cache.py``; ``prepare_data`` builds it on local rank 0, ``setup`` on
every rank reads it) and batches them (``collate.py``). Validation data is a file of its own or a seeded held-out
share of training's distinct prompts, each with all its records (``cache.split_by_prompt``).
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.cache import SplitReport, count_prompts, select, split_by_prompt, tokenized
from lightning_rlhf.data.collate import (
    ComparisonCollator,
    DemonstrationCollator,
    PackedDemonstrationCollator,
    PromptCollator,
    UnpairedCollator,
)
from lightning_rlhf.data.loader import EpochShuffleSampler, ResumableDataLoader
from lightning_rlhf.data.records import ReadReport
from lightning_rlhf.data.shared_prompt import SharedPromptCollator
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.validation import check_range

log = logging.getLogger(__name__)


class RecordDataModule(L.LightningDataModule):
    """Shared reading, splitting and loading; subclasses name the record kind, tokenization and collator."""

    kind: str = ""
    default_train_path: str | None = None

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        tokenizer_name_or_path: str | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        columns: dict[str, str] | None = None,
        split: str = "train",
        val_split: str = "validation",
        skip_invalid: bool = False,
        cache_dir: str | None = None,
        num_proc: int | None = None,
    ):
        """
        Args:
            train_path: .jsonl / .json / .parquet file, saved dataset directory or ``datasets`` name.
                ``None`` uses the embedded toy task's data.
            val_path: validation records; ``None`` holds out ``val_fraction`` of the training prompts.
            val_fraction: share of the distinct training prompts held out, each with all its records (several labels
                or pairs of one prompt never straddle the split), when there is no ``val_path`` (0 for none).
            tokenizer_name_or_path: the model's directory or hub name; ``None`` for the byte-level default.
            max_length: most tokens of prompt + response (prompts are never cut; see ``tokenization.py``).
            batch_size: examples (for comparisons: prompts with all their responses) per batch and device.
            val_batch_size: defaults to ``batch_size``.
            num_workers: DataLoader worker processes.
            seed: shuffling and the held-out split.
            columns: our field -> the source's column, e.g. ``{"prompt": "question", "response": "answer"}``.
            split: split of a ``datasets`` source to train on.
            val_split: split of a ``datasets`` ``val_path`` to validate on.
            skip_invalid: skip invalid records (counted and reported) instead of stopping with an error.
            cache_dir: where tokenized data is kept (memory-mapped Arrow, one directory per source, keyed on its
                content, the tokenizer and these settings); ``None``: the ``datasets`` cache
                (``$HF_DATASETS_CACHE/lightning_rlhf``).
            num_proc: processes that tokenize a source the first time (``datasets.map``); ``None``: this one.
        """
        super().__init__()
        self.save_hyperparameters()
        check_range("val_fraction", val_fraction, "in [0, 1)", 0 <= val_fraction < 1)
        check_range("batch_size", batch_size, ">= 1", batch_size >= 1)
        check_range("val_batch_size", val_batch_size, ">= 1 or None", val_batch_size is None or val_batch_size >= 1)
        check_range("max_length", max_length, ">= 2 (a prompt token and a response token)", max_length >= 2)
        check_range("num_workers", num_workers, ">= 0", num_workers >= 0)
        check_range("num_proc", num_proc, ">= 1 or None", num_proc is None or num_proc >= 1)
        self.tokenizer = None
        self.train_examples: datasets.Dataset | Dataset | list = []  # a Dataset of every example after setup
        self.val_examples: datasets.Dataset | list = []

    # -- what a subclass defines ------------------------------------------------------------------------
    def collator(self):
        raise NotImplementedError

    def extra_sources(self) -> list[tuple[str, str, int]]:
        """``(path, kind, max_length)`` of data besides train and validation, tokenized by ``prepare_data`` too."""
        return []

    def setup_extras(self) -> None:
        """Load any data besides train and validation, once, after the tokenizer is loaded."""

    # -- shared ---------------------------------------------------------------------------------------
    def _train_path(self) -> str:
        path = self.hparams.train_path or self.default_train_path
        if path is None:
            raise ValueError(f"{type(self).__name__} needs train_path")
        return path

    def _tokenized(
        self,
        path: str,
        split: str,
        kind: str | None = None,
        max_length: int | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> tuple[datasets.Dataset, ReadReport]:
        """Every valid record of ``path`` tokenized (an Arrow dataset, read from the cache when it holds it) and the
        ``ReadReport`` of reading it."""
        hp = self.hparams
        return tokenized(
            path,
            kind or self.kind,
            tokenizer or self.tokenizer,
            max_length or hp.max_length,
            hp.columns,
            hp.skip_invalid,
            split,
            hp.cache_dir,
            hp.num_proc,
            all_assistant_turns=hp.get("all_assistant_turns", True),  # DemonstrationDataModule's option
        )

    @staticmethod
    def _report(report: ReadReport) -> None:
        rank_zero_info(report.summary())
        for reason in report.reasons:
            log.warning("skipped %s", reason)

    def prepare_data(self) -> None:
        """Read and tokenize every source into the cache. Lightning runs this on local rank 0 only (per node) and
        makes the other ranks wait before ``setup``, which then reads what it wrote."""
        hp = self.hparams
        tokenizer = load_tokenizer(hp.tokenizer_name_or_path)
        sources = [(self._train_path(), hp.split, self.kind, hp.max_length)]
        if hp.val_path:
            sources.append((hp.val_path, hp.val_split, self.kind, hp.max_length))
        sources += [(path, hp.split, kind, max_length) for path, kind, max_length in self.extra_sources()]
        for path, split, kind, max_length in sources:
            self._tokenized(path, split, kind, max_length, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer_name_or_path)
        train_path = self._train_path()
        if not hp.train_path:
            rank_zero_info(f"{type(self).__name__}: no train_path given, so the toy task's data: {train_path}")
        records, report = self._tokenized(train_path, hp.split)
        self._report(report)
        if hp.val_path:
            val_records, report = self._tokenized(hp.val_path, hp.val_split)
            self._report(report)
            self.train_examples, train_report = select(records)
            self.val_examples, val_report = select(val_records)
            train_rows = val_rows = None
        else:  # a seeded held-out share of the prompts, with every record of each (several labels or pairs per prompt)
            keys = records.data.column("prompt_key").to_numpy()
            train_rows, val_rows = split_by_prompt(keys, hp.val_fraction, hp.seed)
            self.train_examples, train_report = select(records, train_rows)
            self.val_examples, val_report = select(records, val_rows)
            val_records = records
        train_prompts, n_train = count_prompts(records, train_rows)
        val_prompts, n_val = count_prompts(val_records, val_rows)
        self.split_report = SplitReport(
            len(train_prompts), n_train, len(val_prompts), n_val, len(train_prompts & val_prompts)
        )
        if self.split_report.shared_prompts:
            rank_zero_warn(
                f"{hp.val_path}: {self.split_report.shared_prompts} of its {len(val_prompts)} prompts are training "
                f"prompts too ({train_path}): validation on them measures memory as well as generalisation"
            )
        self.tokenize_report = train_report  # with validation's counts added
        self.tokenize_report.add(val_report)
        if not len(self.train_examples):
            raise ValueError(
                f"{train_path}: no training examples left after tokenization ({self.tokenize_report.summary()})"
            )
        rank_zero_info(f"{type(self).__name__}: {self.split_report.summary()}; {self.tokenize_report.summary()}")
        self.setup_extras()

    def train_dataloader(self) -> ResumableDataLoader:
        hp = self.hparams
        return ResumableDataLoader(
            self.train_examples,
            batch_size=hp.batch_size,
            sampler=EpochShuffleSampler(len(self.train_examples), hp.seed),
            collate_fn=self.collator(),
            num_workers=hp.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        hp = self.hparams
        if not len(self.val_examples):
            return []
        return DataLoader(
            self.val_examples,
            batch_size=hp.val_batch_size or hp.batch_size,
            shuffle=False,
            collate_fn=self.collator(),
            num_workers=hp.num_workers,
        )


class DemonstrationDataModule(RecordDataModule):
    """``{"prompt", "response"}`` records (or whole conversations, ``{"messages"}``) for supervised fine-tuning;
    batches from ``DemonstrationCollator``, or with ``packing`` from ``PackedDemonstrationCollator``."""

    kind = "demonstration"
    default_train_path = "toy:demonstrations"

    def __init__(self, *args, packing: bool = False, all_assistant_turns: bool = True, **kwargs):
        """
        Args:
            packing: padding-free batches: each batch's ``batch_size`` demonstrations concatenated into rows of at
                most ``max_length`` tokens, attention kept inside each (``PackedDemonstrationCollator``).
            all_assistant_turns: the loss on every assistant turn of a conversation (TRL's ``assistant_only_loss``);
                ``False``: on its last one only.
            *args, **kwargs: as ``RecordDataModule``.
        """
        super().__init__(*args, **kwargs)
        self.packing = packing  # all_assistant_turns is read from hparams (RecordDataModule._tokenized)

    def collator(self) -> DemonstrationCollator | PackedDemonstrationCollator:
        if self.packing:
            return PackedDemonstrationCollator(self.tokenizer.pad_token_id, self.hparams.max_length)
        return DemonstrationCollator(self.tokenizer.pad_token_id)


class ComparisonDataModule(RecordDataModule):
    """``{"prompt", "responses", "ranks"}`` (or ``chosen`` / ``rejected``) records, batched by prompt.

    Optionally also a reward-normalisation set: demonstrations whose mean reward ``RewardModule`` stores as its
    offset when fit ends (``normalize_dataloader``). Like the training data, it defaults to the toy task's only
    when the training data is the toy task's: a user's comparisons are never normalised on toy demonstrations.
    """

    kind = "comparison"
    default_train_path = "toy:comparisons"
    default_normalize_path = "toy:demonstrations"

    def __init__(
        self,
        *args,
        normalize_path: str | None = None,
        normalize_max_records: int | None = 1000,
        shared_prompt: bool = False,
        row_length: int | None = None,
        **kwargs,
    ):
        """
        Args:
            normalize_path: demonstration records (``{"prompt", "response"}``, e.g. the SFT data) whose mean reward
                ``RewardModule`` subtracts at scoring time, so that they average 0. ``None``: the toy task's
                demonstrations when training on its shipped comparisons (no ``train_path``), else no normalisation.
            normalize_max_records: use at most this many of them (the first ones).
            shared_prompt: each prompt once, then its responses, several prompts per padding-free row, each response
                seeing the prompt and itself only (``SharedPromptCollator``): the same per-response log-probs and
                rewards as the padded layout, for fewer tokens. Models it is not exact for are refused at the first
                batch.
            row_length: most tokens of a shared-prompt row (a prompt with its responses longer than that gets a row
                of its own); ``None``: ``max_length``.
            *args, **kwargs: as ``RecordDataModule``.
        """
        super().__init__(*args, **kwargs)
        check_range("row_length", row_length, ">= 1 or None", row_length is None or row_length >= 1)
        self.shared_prompt, self.row_length = shared_prompt, row_length
        if normalize_path is None and not self.hparams.train_path:
            normalize_path = self.default_normalize_path
        self.normalize_path, self.normalize_max_records = normalize_path, normalize_max_records
        self.normalize_examples: datasets.Dataset | list = []

    def extra_sources(self) -> list[tuple[str, str, int]]:
        return [(self.normalize_path, "demonstration", self.hparams.max_length)] if self.normalize_path else []

    def setup_extras(self) -> None:
        if not self.normalize_path:
            return
        demonstrations, report = self._tokenized(self.normalize_path, self.hparams.split, "demonstration")
        self._report(report)
        count = min(len(demonstrations), self.normalize_max_records or len(demonstrations))
        self.normalize_examples, counts = select(demonstrations, np.arange(count))
        if not len(self.normalize_examples):
            raise ValueError(f"{self.normalize_path}: no normalisation examples ({counts.summary()})")

    def collator(self) -> ComparisonCollator | SharedPromptCollator:
        if self.shared_prompt:
            return SharedPromptCollator(self.tokenizer.pad_token_id, self.row_length or self.hparams.max_length)
        return ComparisonCollator(self.tokenizer.pad_token_id)

    def normalize_dataloader(self) -> DataLoader | None:
        """The normalisation set, whole on every rank (each rank scores all of it, so all agree); ``None`` if unset."""
        if not len(self.normalize_examples):
            return None
        hp = self.hparams
        return DataLoader(
            self.normalize_examples,
            batch_size=hp.val_batch_size or hp.batch_size,
            shuffle=False,
            collate_fn=DemonstrationCollator(self.tokenizer.pad_token_id),
            num_workers=hp.num_workers,
        )


class UnpairedDataModule(RecordDataModule):
    """KTO's unpaired feedback, ``{"prompt", "completion", "label": true|false}`` records, or comparisons read as
    their best response desirable and their worst undesirable (``records.validate_unpaired``); batched by prompt
    (``batch_size`` records), each prompt with one mismatched row more for KTO's reference point
    (``UnpairedCollator``). Without ``train_path``, the toy task's comparisons."""

    kind = "unpaired"
    default_train_path = "toy:comparisons"

    def __init__(self, *args, shared_prompt: bool = False, row_length: int | None = None, **kwargs):
        """
        Args:
            shared_prompt: each prompt once, then its completions (``ComparisonDataModule``'s layout).
            row_length: most tokens of a shared-prompt row; ``None``: ``max_length``.
            *args, **kwargs: as ``RecordDataModule``.
        """
        super().__init__(*args, **kwargs)
        check_range("row_length", row_length, ">= 1 or None", row_length is None or row_length >= 1)
        self.shared_prompt, self.row_length = shared_prompt, row_length

    def collator(self) -> UnpairedCollator:
        hp = self.hparams
        if self.shared_prompt:
            comparisons = SharedPromptCollator(self.tokenizer.pad_token_id, self.row_length or hp.max_length)
        else:
            comparisons = ComparisonCollator(self.tokenizer.pad_token_id)
        return UnpairedCollator(comparisons, hp.max_length)


class WithPretraining(Dataset):
    """Prompts paired with pretraining texts for PPO-ptx: item ``i`` is prompt ``i mod P`` carrying text ``i mod N``
    under ``"ptx"``, for ``max(P, N)`` items, so an epoch meets every prompt and every text (the shorter cycles)."""

    def __init__(self, prompts: datasets.Dataset, texts: datasets.Dataset):
        self.prompts, self.texts = prompts, texts

    def __len__(self) -> int:
        return max(len(self.prompts), len(self.texts))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.prompts[i % len(self.prompts)], "ptx": self.texts[i % len(self.texts)]}


class PromptDataModule(RecordDataModule):
    """``{"prompt"}`` records, left-padded for generation; ``max_length`` bounds the prompt alone.

    With ``pretrain_path``, each training example also carries a pretraining text (``{"text"}`` records) for
    PPO-ptx's language-model term (see ``WithPretraining`` and ``PromptCollator``); validation has prompts only.
    """

    kind = "prompt"
    default_train_path = "toy:prompts"

    def __init__(self, *args, pretrain_path: str | None = None, pretrain_max_length: int = 512, **kwargs):
        """
        Args:
            pretrain_path: ``{"text"}`` records (same sources and ``columns`` remapping as the prompts) for PPO-ptx;
                ``None`` for none.
            pretrain_max_length: tokens kept of each text (its start).
            *args, **kwargs: as ``RecordDataModule``.
        """
        super().__init__(*args, **kwargs)
        self.pretrain_path, self.pretrain_max_length = pretrain_path, pretrain_max_length
        self.pretrain_examples: datasets.Dataset | list = []

    def extra_sources(self) -> list[tuple[str, str, int]]:
        return [(self.pretrain_path, "text", self.pretrain_max_length)] if self.pretrain_path else []

    def setup_extras(self) -> None:
        if not self.pretrain_path:
            return
        texts, report = self._tokenized(self.pretrain_path, self.hparams.split, "text", self.pretrain_max_length)
        self._report(report)
        self.pretrain_examples, counts = select(texts)
        rank_zero_info(f"pretraining texts: {counts.summary()}")
        self.train_examples = WithPretraining(self.train_examples, self.pretrain_examples)

    def collator(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id)
