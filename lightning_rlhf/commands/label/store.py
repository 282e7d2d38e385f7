"""The labels file and who has ranked what: everything the labelling server does that is not HTTP.

Items are the ``{"prompt", "responses"}`` records of ``--input`` (as ``lightning-rlhf sample`` writes them), named
by their position, 0 first. Every accepted label is one JSON line appended to ``--output`` and fsynced before it is
acknowledged, so the file is the only state: a restarted server reads it back and carries on.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_rlhf.data.records import (
    EMPTY_PROMPT,
    RecordError,
    _check_text_or_messages,
    read_rows,
    validate_comparison,
)

LABEL_FIELDS = {"labeller", "item", "ranks", "ratings", "flags", "demonstration"}
RATINGS = range(1, 8)  # a Likert scale of overall quality, 1 worst, 7 best, as in InstructGPT's labelling interface


class LabelError(ValueError):
    """A label the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def read_items(path: str) -> list[dict[str, Any]]:
    """The ``{"prompt", "responses"}`` records of ``path`` (extra fields such as ``ranks`` are ignored)."""
    items = []
    for location, row in read_rows(path):
        try:
            if isinstance(row, RecordError):
                raise row
            if not isinstance(row, Mapping):
                raise RecordError(f"expected a JSON object, got {type(row).__name__}")
            responses = row.get("responses")
            if not isinstance(responses, list) or len(responses) < 2:
                raise RecordError("field 'responses' must be a list of at least 2 responses")
            items.append(
                {
                    "prompt": _check_text_or_messages(row, "prompt", EMPTY_PROMPT),
                    "responses": [
                        _check_text_or_messages({f"responses[{i}]": r}, f"responses[{i}]")
                        for i, r in enumerate(responses)
                    ],
                }
            )
        except RecordError as err:
            raise RecordError(f"{location}: {err}") from None
    if not items:
        raise RecordError(f"{path}: no records to label")
    return items


def check_ratings(ratings: Any, size: int) -> list[int | None] | None:
    """``ratings`` of a label with ``size`` responses: ``None`` (none given) or one entry per response, each an
    integer 1..7 (7 best) or ``None`` (not rated); ``RecordError`` naming the field otherwise."""
    if ratings is None:
        return None
    if not isinstance(ratings, list) or len(ratings) != size:
        got = f"{len(ratings)} entries" if isinstance(ratings, list) else f"a {type(ratings).__name__}"
        raise RecordError(
            f"field 'ratings' must be a list of {size} entries, one per response (1..7 or null), got {got}"
        )
    for i, rating in enumerate(ratings):
        if rating is None:
            continue
        if not isinstance(rating, int) or isinstance(rating, bool):
            raise RecordError(
                f"field 'ratings[{i}]' = {json.dumps(rating, default=repr)} is not an integer: rate 1..7, or null"
            )
        if rating not in RATINGS:
            raise RecordError(f"field 'ratings[{i}]' = {rating} is out of range: 1 (worst) to 7 (best), or null")
    return ratings


def check_label(body: Any, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The output record for a label posted as ``body``; ``LabelError`` (naming the field) if it is not one.

    ``body``: ``{"labeller": name, "item": index, "ranks": [...], "ratings"?: [1..7 or null, ...], "flags"?:
    [{"response": index, "reason": text}], "demonstration"?: text}``; ranks are 0 best, ties equal, one per response.
    """
    if not isinstance(body, Mapping):
        raise LabelError(f"the body must be a JSON object, got {type(body).__name__}")
    if unknown := sorted(set(body) - LABEL_FIELDS):
        raise LabelError(f"unknown fields {unknown}; a label has {sorted(LABEL_FIELDS)}")
    labeller = body.get("labeller")
    if not isinstance(labeller, str) or not labeller.strip() or len(labeller) > 100:
        raise LabelError("field 'labeller' must be a non-empty name of at most 100 characters")
    item = body.get("item")
    if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < len(items):
        raise LabelError(f"field 'item' = {item!r}: no such item (there are {len(items)}, 0 to {len(items) - 1})", 404)
    record = {**items[item], "ranks": body.get("ranks")}
    size = len(record["responses"])
    try:
        validate_comparison(record)
        ratings = check_ratings(body.get("ratings"), size)
    except RecordError as err:
        raise LabelError(str(err), 422) from None
    flags = body.get("flags") or []
    if not isinstance(flags, list) or not all(
        isinstance(f, Mapping)
        and set(f) == {"response", "reason"}
        and isinstance(f["response"], int)
        and 0 <= f["response"] < size
        and isinstance(f["reason"], str)
        and f["reason"].strip()
        for f in flags
    ):
        raise LabelError(f"field 'flags' must be a list of {{'response': 0..{size - 1}, 'reason': text}}", 422)
    demonstration = body.get("demonstration")
    if demonstration is not None and not isinstance(demonstration, str):
        raise LabelError("field 'demonstration' must be text", 422)
    record.update(labeller=labeller.strip(), item=item, time=datetime.datetime.now(datetime.timezone.utc).isoformat())
    if ratings and any(rating is not None for rating in ratings):
        record["ratings"] = ratings
    if flags:
        record["flags"] = [{"response": f["response"], "reason": f["reason"].strip()} for f in flags]
    if demonstration and demonstration.strip():
        record["demonstration"] = demonstration
    return record


def read_labels(path: str | os.PathLike, items: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The label records of ``path``: valid comparisons with ``labeller`` and ``item``, one per (item, labeller).
    With ``items``, each must be the labelled item itself (the same prompt and responses)."""
    labels, seen = [], set()
    for location, row in read_rows(str(path)):
        try:
            if isinstance(row, RecordError):
                raise row
            if not isinstance(row, Mapping):
                raise RecordError(f"expected a JSON object, got {type(row).__name__}")
            validate_comparison(row)
            check_ratings(row.get("ratings"), len(row["responses"]))
            if not isinstance(row.get("labeller"), str) or not isinstance(row.get("item"), int) or row["item"] < 0:
                raise RecordError("fields 'labeller' (text) and 'item' (an integer from 0) are required in a label")
            if items is not None and (
                row["item"] >= len(items) or {k: row[k] for k in ("prompt", "responses")} != items[row["item"]]
            ):
                raise RecordError(f"item {row['item']} is not the input's item {row['item']}: was --input changed?")
            if (row["item"], row["labeller"]) in seen:
                raise RecordError(f"labeller {row['labeller']!r} labelled item {row['item']} twice")
        except RecordError as err:
            raise RecordError(f"{location}: {err}") from None
        seen.add((row["item"], row["labeller"]))
        labels.append(dict(row))
    return labels


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline: a write cut short by a crash, never acknowledged to its labeller."""
    with path.open("rb+") as data:
        content = data.read()
        if content and not content.endswith(b"\n"):
            keep = content.rfind(b"\n") + 1
            print(f"{path}: dropping an incomplete last line ({len(content) - keep} bytes)", file=sys.stderr)
            data.truncate(keep)


class LabelStore:
    """Hands out items and appends labels; thread-safe.

    Args:
        items: what to label (``read_items``).
        output: the labels file; labels already in it count (resuming), new ones are appended.
        labellers_per_item: serve each item until this many labellers have ranked it.
        lease_seconds: an item handed to a labeller counts as taken by them for this long, so that labellers
            working at the same time get different items while they are still short of labellers.
    """

    def __init__(
        self,
        items: list[dict[str, Any]],
        output: str | os.PathLike,
        labellers_per_item: int = 1,
        lease_seconds: float = 600,
    ):
        if labellers_per_item < 1:
            raise ValueError(f"labellers_per_item must be at least 1, got {labellers_per_item}")
        self.items, self.output = items, Path(output)
        self.labellers_per_item, self.lease_seconds = labellers_per_item, lease_seconds
        self.labelled_by: list[set[str]] = [set() for _ in items]
        self.leases: dict[str, tuple[int, float]] = {}  # labeller -> (item, when)
        self._lock = threading.Lock()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.output.exists():
            _drop_torn_tail(self.output)
            for label in read_labels(self.output, items):
                self.labelled_by[label["item"]].add(label["labeller"])
        self._fd = os.open(self.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def progress(self, labeller: str) -> dict[str, int]:
        """``done`` / ``total``: labels still wanted, over all items; ``yours``: labels by ``labeller``."""
        cap = self.labellers_per_item
        return {
            "done": sum(min(len(names), cap) for names in self.labelled_by),
            "total": len(self.items) * cap,
            "yours": sum(labeller in names for names in self.labelled_by),
        }

    def next_item(self, labeller: str) -> dict[str, Any] | None:
        """The item to show ``labeller`` (with ``progress``), or ``None`` when nothing is left for them: the one they
        were last given if still unlabelled by them, else the first item short of labellers counting the
        leases of others, else any item still short of labellers that they have not labelled."""
        with self._lock:
            now = time.monotonic()
            self.leases = {name: lease for name, lease in self.leases.items() if now - lease[1] < self.lease_seconds}
            held = self.leases.get(labeller)
            if held is not None and labeller not in self.labelled_by[held[0]]:
                chosen = held[0]
            else:
                leased = Counter(item for name, (item, _) in self.leases.items() if name != labeller)
                open_items = [
                    i
                    for i, names in enumerate(self.labelled_by)
                    if labeller not in names and len(names) < self.labellers_per_item
                ]
                if not open_items:
                    return None
                chosen = min(
                    open_items, key=lambda i: (len(self.labelled_by[i]) + leased[i] >= self.labellers_per_item, i)
                )
            self.leases[labeller] = (chosen, now)
            return {"item": chosen, **self.items[chosen], **self.progress(labeller)}

    def add(self, body: Any) -> dict[str, Any]:
        """Check a posted label, append it to the output (flushed and fsynced) and return the record written."""
        record = check_label(body, self.items)
        with self._lock:
            if record["labeller"] in self.labelled_by[record["item"]]:
                raise LabelError(f"{record['labeller']!r} has already labelled item {record['item']}", 409)
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            start = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                while line:
                    line = line[os.write(self._fd, line) :]
                os.fsync(self._fd)
            except OSError:  # e.g. a full disk: leave no partial line for the next label to follow
                os.ftruncate(self._fd, start)
                raise
            self.labelled_by[record["item"]].add(record["labeller"])
            if self.leases.get(record["labeller"], (None,))[0] == record["item"]:
                del self.leases[record["labeller"]]
        return record

    def close(self) -> None:
        os.close(self._fd)
