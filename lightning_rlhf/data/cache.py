"""Records -> tokenized examples in a memory-mapped Arrow dataset on disk, built once and read by every rank.

``tokenized(...)`` reads a source (``records.read_rows``), validates each record as ``read_records`` does, writes the
valid ones to Arrow (``datasets.Dataset.from_generator``), tokenizes them with ``datasets.Dataset.map`` (``num_proc``
worker processes) through the same ``Tokenizer`` as the list-based path (each map batch's texts in one tokenizer call),
writing its Arrow file(s) into ``cache_dir/<kind>-<key>``: ``key`` hashes the source's content (a file's bytes, a
``datasets`` fingerprint), the record kind, the column mapping, the tokenizer (vocabulary, special tokens, chat
template), ``max_length``, ``skip_invalid`` and ``Tokenizer``'s options (``all_assistant_turns``), so a changed file or
setting never reuses a stale cache. A later call with the same key memory-maps those files
(``datasets.Dataset.from_file``): nothing is read or tokenized again.

Rows keep the record's ``location`` (``file line N``), ``prompt_key`` (a hash of its prompt: a held-out split keeps
every record of a prompt on one side, ``split_by_prompt``) and what tokenizing it found: ``skipped`` (an over-long
prompt under ``skip_invalid``) and ``truncated`` / ``texts_truncated`` (cut responses and texts), so the counts the
list-based path reported are sums over the rows a DataModule uses (``select``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lightning_rlhf.data.records import ReadReport, Record, RecordError, read_rows, validated_rows
from lightning_rlhf.data.tokenization import Tokenizer, TokenizeReport
from lightning_rlhf.io import unwritable_reason
from lightning_rlhf.toy import resolve_source

# Raise when the layout of the cached rows or the tokenization rules change: old caches are then never read.
CACHE_VERSION = 3  # 2: rows carry prompt_key; 3: prompt rows carry their fields (environments reset from them),
# messages keep their keys (tool_calls, ...), conversations
REASONS_KEPT = 5  # skipped records' reasons kept with the cache (the count is exact)


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "lightning_rlhf"


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(source: str, split: str) -> str:
    """What identifies the records of ``source``: a file's content, else the ``datasets`` fingerprint of the split."""
    path = Path(resolve_source(source))
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    else:
        read_rows(str(path), split)  # the reader's error for a missing file, a FIFO, or a name that does not load
        dataset = datasets.load_dataset(source, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    return dataset._fingerprint


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything about the tokenizer that changes token ids: its model, normaliser and added tokens (a fast
    tokenizer's JSON), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    described = [type(tokenizer).__name__, model, tokenizer.chat_template, tokenizer.special_tokens_map]
    return hashlib.blake2b(json.dumps(described, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _valid_rows(
    source: str, kind: str, columns: Mapping[str, str], skip_invalid: bool, split: str, reasons_file: str
) -> Iterator[dict[str, str]]:
    """Valid records as ``{"location", "record"}`` (the validated fields as JSON: a prompt may be a string in one
    record and chat messages in the next). Invalid ones raise, or are counted into ``reasons_file`` when skipped."""
    skipped, reasons = 0, []
    for location, fields in validated_rows(source, kind, columns, skip_invalid, split):
        if isinstance(fields, RecordError):
            skipped += 1
            if len(reasons) < REASONS_KEPT:
                reasons.append(str(fields))
            continue
        yield {"location": location, "record": json.dumps(fields, ensure_ascii=False)}
    Path(reasons_file).write_text(json.dumps({"skipped": skipped, "reasons": reasons}))


class _TokenizeBatch:
    """``datasets.map`` function: a batch of ``{"location", "record"}`` rows -> their tokenized columns."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, kind: str, max_length: int, skip_invalid: bool, **options):
        self.tokenizer, self.kind, self.max_length, self.skip_invalid = tokenizer, kind, max_length, skip_invalid
        self.options = options  # the Tokenizer's own (all_assistant_turns)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        records = [
            Record(loc, json.loads(fields)) for loc, fields in zip(batch["location"], batch["record"], strict=True)
        ]
        tokenizer = Tokenizer(self.tokenizer, self.max_length, self.skip_invalid, **self.options)
        out: dict[str, list] = {}
        examples = tokenizer.examples(self.kind, records)  # the batch's texts tokenized together
        for record, (example, counts) in zip(records, examples, strict=True):
            row = {**EMPTY[self.kind], **(example or {}), "skipped": example is None}
            row["prompt_key"] = prompt_key(record.fields)
            row |= {"truncated": counts.truncated, "texts_truncated": counts.texts_truncated}
            for name, value in row.items():
                out.setdefault(name, []).append(value)
        return out


def prompt_key(fields: Mapping[str, Any]) -> int:
    """A 63-bit hash of a record's prompt (of its text, for pretraining text): equal prompts, string or chat
    messages, get equal keys in every process and run (no Python ``hash`` salt)."""
    prompt = fields.get("prompt", fields.get("text"))
    digest = hashlib.blake2b(json.dumps(prompt, ensure_ascii=False).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # fits an int64 column


# What a skipped record's row holds (its columns must exist with their types).
EMPTY: dict[str, dict[str, Any]] = {
    "demonstration": {"input_ids": [], "labels": []},
    "comparison": {"prompt_ids": [], "response_ids": [], "ranks": []},
    "unpaired": {"prompt_ids": [], "response_ids": [], "desirable": []},
    "prompt": {"input_ids": [], "fields": "{}"},
    "text": {"input_ids": [], "labels": []},
}
ids = datasets.Sequence(datasets.Value("int32"))
FEATURES: dict[str, dict[str, Any]] = {
    "demonstration": {"input_ids": ids, "labels": ids},
    "comparison": {"prompt_ids": ids, "response_ids": datasets.Sequence(ids), "ranks": ids},
    "unpaired": {"prompt_ids": ids, "response_ids": datasets.Sequence(ids), "desirable": ids},
    "prompt": {"input_ids": ids, "fields": datasets.Value("string")},
    "text": {"input_ids": ids, "labels": ids},
}


def _build(
    target: Path,
    source: str,
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    columns: Mapping[str, str],
    skip_invalid: bool,
    split: str,
    num_proc: int | None,
    options: dict[str, Any],
) -> None:
    if reason := unwritable_reason(target.parent):
        raise OSError(
            f"cache_dir {target.parent}: tokenized data cannot be written there ({reason}); give a writable cache_dir "
            "(or set HF_DATASETS_CACHE)"
        )
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        reasons_file = str(work / "read_report.json")
        gen_kwargs = {"source": source, "kind": kind, "columns": dict(columns), "skip_invalid": skip_invalid}
        gen_kwargs |= {"split": split, "reasons_file": reasons_file}
        try:
            records = datasets.Dataset.from_generator(_valid_rows, gen_kwargs=gen_kwargs, cache_dir=str(work / "read"))
        except datasets.exceptions.DatasetGenerationError as err:
            # datasets wraps what the generator raised; a bad record's error is the user's answer, unwrapped.
            if isinstance(err.__cause__, RecordError | OSError):
                raise err.__cause__ from None
            raise
        features = datasets.Features(
            {"location": datasets.Value("string"), **FEATURES[kind], "skipped": datasets.Value("bool")}
            | {"prompt_key": datasets.Value("int64")}
            | {"truncated": datasets.Value("int32"), "texts_truncated": datasets.Value("int32")}
        )
        staging = work / "dataset"
        staging.mkdir()
        records.map(
            _TokenizeBatch(tokenizer, kind, max_length, skip_invalid, **options),
            batched=True,
            num_proc=num_proc,
            remove_columns=["record"],
            features=features,
            cache_file_name=str(staging / "examples.arrow"),  # with num_proc: examples_0000N_of_0000M.arrow
            new_fingerprint=target.name,  # no hashing of the tokenizer: the key already names it
            desc=f"tokenizing {source}",
        )
        shutil.copy(reasons_file, staging / "read_report.json")
        try:
            os.rename(staging, target)
        except OSError:
            if not target.exists():  # else another process built the same cache first: keep theirs
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tokenized(
    source: str,
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    columns: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    all_assistant_turns: bool = True,
) -> tuple[datasets.Dataset, ReadReport]:
    """Every valid record of ``source`` tokenized (rows in source order), and what reading it found.

    Loads ``cache_dir/<key>`` when it exists (see the module's docstring), else builds it first.
    ``all_assistant_turns``: as ``Tokenizer``'s (a conversation's labels train every assistant turn, or the last).

    Raises:
        RecordError: on the first invalid record (naming file, record and field), or when no record is valid.
    """
    columns = dict(columns or {})
    described = [CACHE_VERSION, source_fingerprint(source, split), kind, sorted(columns.items()), max_length]
    options = {"all_assistant_turns": all_assistant_turns}
    described += [skip_invalid, tokenizer_fingerprint(tokenizer), options]
    key = hashlib.blake2b(json.dumps(described).encode(), digest_size=16).hexdigest()
    target = Path(cache_dir or default_cache_dir()) / f"{kind}-{key}"
    if not target.exists():
        _build(target, source, kind, tokenizer, max_length, columns, skip_invalid, split, num_proc, options)
    shards = sorted(target.glob("examples*.arrow"))  # in order: one per num_proc worker, zero-padded names
    dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(shard)) for shard in shards])
    found = json.loads((target / "read_report.json").read_text())
    report = ReadReport(source=source, kept=len(dataset), skipped=found["skipped"], reasons=found["reasons"])
    if not len(dataset):
        what = "no records" if not report.skipped else f"no valid records ({report.skipped} skipped)"
        raise RecordError(f"{source}: {what} of kind {kind!r}")
    return dataset, report


def select(dataset: datasets.Dataset, indices: np.ndarray | None = None) -> tuple[datasets.Dataset, TokenizeReport]:
    """Rows ``indices`` (all when ``None``, else in their order) of a dataset as ``tokenized`` returns it, less those
    tokenizing skipped, with the tokenized columns only; and the list-based path's counts over those rows.

    The counts come from three small columns as arrays, and the rows kept are an index mapping kept in memory: no
    row's token ids are read, and nothing is written next to the cached files.
    """
    rows = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    column = {name: dataset.data.column(name).to_numpy()[rows] for name in ("skipped", "truncated", "texts_truncated")}
    report = TokenizeReport(
        truncated=int(column["truncated"].sum()),
        skipped=int(column["skipped"].sum()),
        texts_truncated=int(column["texts_truncated"].sum()),
    )
    chosen = dataset.select(rows[~column["skipped"]], keep_in_memory=True)
    return chosen.remove_columns(["location", "prompt_key", "skipped", "truncated", "texts_truncated"]), report


@dataclass
class SplitReport:
    """How many distinct prompts and examples (records kept after tokenizing) went to each side of a split; for a
    separate validation file, how many of its prompts training has too."""

    train_prompts: int
    train_examples: int
    val_prompts: int
    val_examples: int
    shared_prompts: int = 0

    def summary(self) -> str:
        shared = f"; {self.shared_prompts} validation prompts also in training" if self.shared_prompts else ""
        return (
            f"{self.train_examples} train / {self.val_examples} val examples of {self.train_prompts} / "
            f"{self.val_prompts} distinct prompts{shared}"
        )


def split_by_prompt(keys: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(training, held out)`` of a split that keeps every row of a prompt on one side.

    ``keys`` is ``(n,)``, one prompt key per row. The distinct prompts, numbered in order of first appearance, are
    permuted with ``seed`` (``torch.randperm``); the first ``round(P · fraction)`` of the ``P`` prompts are held out
    with all their rows. Training rows come sorted; held-out rows in the permutation's order of prompts, each prompt's
    rows in file order. With every prompt distinct this is exactly the former per-record split (rows permuted,
    the first ``round(n · fraction)`` held out), so data without repeated prompts splits as it always did.
    """
    _, first_row, prompt_of_row = np.unique(keys, return_index=True, return_inverse=True)
    appearance = np.empty(len(first_row), dtype=np.int64)
    appearance[np.argsort(first_row, kind="stable")] = np.arange(len(first_row))
    prompt_of_row = appearance[prompt_of_row.reshape(-1)]  # prompts numbered by first appearance
    order = torch.randperm(len(first_row), generator=torch.Generator().manual_seed(seed)).numpy()
    place = np.empty_like(order)
    place[order] = np.arange(len(order))  # each prompt's place in the permutation
    n_held = round(len(first_row) * fraction)
    held = place[prompt_of_row] < n_held
    held_rows = np.flatnonzero(held)
    return np.flatnonzero(~held), held_rows[np.argsort(place[prompt_of_row[held_rows]], kind="stable")]


def count_prompts(dataset: datasets.Dataset, rows: np.ndarray | None = None) -> tuple[set[int], int]:
    """The distinct prompt keys and the number of rows among ``rows`` (all when ``None``) that tokenizing kept."""
    keep = ~dataset.data.column("skipped").to_numpy()
    keys = dataset.data.column("prompt_key").to_numpy()
    chosen = np.arange(len(dataset)) if rows is None else rows
    chosen = chosen[keep[chosen]]
    return set(keys[chosen].tolist()), len(chosen)
