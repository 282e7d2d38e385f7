"""Reading and validating records: demonstrations, comparisons, unpaired (KTO) feedback, prompts and pretraining
text.

A source is a ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory written by ``datasets.save_to_disk``, or a
``datasets`` name. Every record keeps where it came from (``file line N`` / ``file row N``) so that any error
can name the file, the record and the field. Invalid records raise ``RecordError`` unless the caller asked to
skip them, in which case they are counted in ``ReadReport.skipped`` (never dropped silently).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_rlhf.data.conversations import check_turns, checked_messages
from lightning_rlhf.toy import resolve_source

FILE_TYPES = (".jsonl", ".json", ".parquet")


class RecordError(ValueError):
    """A record that does not match its format; the message names file, record and field."""


@dataclass
class Record:
    """A validated record and where it came from (e.g. ``data/train.jsonl line 7``)."""

    location: str
    fields: dict[str, Any]


@dataclass
class ReadReport:
    """What reading a source found: records kept and, when skipping was asked for, what was skipped and why."""

    source: str
    kept: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.source}: {self.kept} records"
        if self.skipped:
            text += f", {self.skipped} invalid records skipped (first: {self.reasons[0]})"
        return text


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _checked(name: str, check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``, its ``ValueError`` raised as the ``RecordError`` of field ``name``."""
    try:
        return check(*args)
    except ValueError as err:
        raise RecordError(f"field {name!r}: {err}") from None


# Where an empty string is refused, why. Anywhere else a response may be empty: the end-of-turn token at once is a real
# answer (usually a bad one), which a reward model must have seen ranked before PPO's rollouts reach it.
EMPTY_PROMPT = "a response answers a prompt, and there is nothing to answer (an empty response, by contrast, is valid)"


EMPTY_DEMONSTRATION = (
    "a demonstration teaches the tokens of its response, and an empty one teaches nothing but to stop at once; leave "
    "the record out (in a comparison an empty response is valid: rank it)"
)


def _check_text_or_messages(record: Mapping[str, Any], name: str, empty_refused: str | None = None) -> Any:
    """The field's string or chat messages; an empty string is valid unless ``empty_refused`` says why it is not."""
    if name not in record or record[name] is None:
        raise RecordError(f"field {name!r} is missing")
    value = record[name]
    if _is_text(value):
        if not value and empty_refused:
            raise RecordError(f"field {name!r} is an empty string: {empty_refused}")
        return value
    if isinstance(value, list) and value:
        return _checked(name, checked_messages, value)
    raise RecordError(
        f"field {name!r} must be a string or a list of chat messages {{'role': str, 'content': str}}, "
        f"got {type(value).__name__}"
    )


def validate_demonstration(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt", "response"}``, or a whole conversation: TRL's ``{"messages"}`` (no ``response``), read as the
    messages before the first assistant one for the prompt and the rest for the response, which trains every
    assistant turn. Either may carry ``tools`` (JSON schemas, ``transformers.utils.get_json_schema``'s) for the
    chat template; a response of several messages is a conversation: assistant turns with tool or user messages
    between them, ending with the assistant's."""
    if "messages" in record and "response" not in record:
        messages = _check_text_or_messages(record, "messages")
        if isinstance(messages, str):
            raise RecordError("field 'messages' must be a list of chat messages, got a string")
        _checked("messages", check_turns, messages)
        first = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
        fields = {"prompt": messages[:first], "response": messages[first:]}
    else:
        fields = {
            "prompt": _check_text_or_messages(record, "prompt", EMPTY_PROMPT),
            "response": _check_text_or_messages(record, "response", EMPTY_DEMONSTRATION),
        }
    tools = record.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
            raise RecordError(f"field 'tools' must be a list of JSON schemas (objects), got {tools!r:.80}")
        fields["tools"] = tools
    response = fields["response"]
    if tools is not None or (isinstance(response, list) and len(response) > 1):  # tokenized turn by turn
        if isinstance(fields["prompt"], str):
            what = "'tools' go" if tools is not None else "a conversation in 'response' goes"
            raise RecordError(f"field 'prompt' is a string, but {what} with chat messages: give it as messages")
        if isinstance(response, list):
            _checked("response", check_turns, response, True)
        if fields["prompt"][-1]["role"] == "assistant":
            raise RecordError(
                "field 'prompt' ends with an assistant message and the response is the assistant's: merge the two, "
                "or put the user's or tool's message between them"
            )
    return fields


def validate_scored(record: Mapping[str, Any]) -> dict[str, Any]:
    """A ``{"prompt", "response"}`` to score (``lightning-rlhf score``); the response may be empty (EOS at once)."""
    return {
        "prompt": _check_text_or_messages(record, "prompt", EMPTY_PROMPT),
        "response": _check_text_or_messages(record, "response"),
    }


def validate_prompt(record: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt checked; the record's other fields kept as they are (an environment may reset from them, e.g. an
    answer to check)."""
    return {**record, "prompt": _check_text_or_messages(record, "prompt", EMPTY_PROMPT)}


def validate_text(record: Mapping[str, Any]) -> dict[str, Any]:
    value = record.get("text")
    if not isinstance(value, str) or not value:
        raise RecordError(f"field 'text' must be a non-empty string, got {type(value).__name__}")
    return {"text": value}


def validate_comparison(record: Mapping[str, Any]) -> dict[str, Any]:
    """``responses`` + ``ranks`` (0 best, ties equal), or the pairwise ``chosen`` / ``rejected`` shorthand."""
    prompt = _check_text_or_messages(record, "prompt", EMPTY_PROMPT)
    pairwise = [k for k in ("chosen", "rejected") if k in record]
    ranked = [k for k in ("responses", "ranks") if k in record]
    if pairwise and ranked:
        raise RecordError(
            f"fields {ranked} and {pairwise} are both present: give either 'responses' + 'ranks' or 'chosen' + "
            "'rejected', not both (which one holds the preference?)"
        )
    if pairwise:
        chosen = _check_text_or_messages(record, "chosen")
        rejected = _check_text_or_messages(record, "rejected")
        if chosen == rejected:
            raise RecordError("fields 'chosen' and 'rejected' are the same response")
        return {"prompt": prompt, "responses": [chosen, rejected], "ranks": [0, 1]}
    responses, ranks = record.get("responses"), record.get("ranks")
    if not isinstance(responses, list):
        raise RecordError("field 'responses' must be a list of responses (or give 'chosen' and 'rejected')")
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise RecordError("field 'ranks' must be a list of integers, one per response (0 = best)")
    if len(ranks) != len(responses):
        raise RecordError(f"field 'ranks' has {len(ranks)} entries but 'responses' has {len(responses)}")
    if len(responses) < 2:
        raise RecordError(f"field 'responses' has {len(responses)} response; a comparison needs at least 2")
    if any(r < 0 or r >= len(ranks) for r in ranks):
        raise RecordError(f"field 'ranks' = {ranks}: each rank must lie in 0..{len(ranks) - 1}")
    if len(set(ranks)) == 1:
        raise RecordError(f"field 'ranks' = {ranks}: all responses tie, so there is no preference to learn")
    checked = [_check_text_or_messages({f"responses[{i}]": r}, f"responses[{i}]") for i, r in enumerate(responses)]
    seen: dict[str, int] = {}
    for response, rank in zip(checked, ranks, strict=True):
        key = json.dumps(response)
        if seen.setdefault(key, rank) != rank:
            raise RecordError(f"field 'responses': the same response appears with ranks {seen[key]} and {rank}")
    return {"prompt": prompt, "responses": checked, "ranks": ranks}


def unpaired_from_comparison(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """KTO records from a validated comparison (``validate_comparison``'s fields): every response ranked best is
    desirable, every response ranked worst undesirable; the responses ranked in between are left out.

    ``{"prompt": p, "responses": [a, b, c], "ranks": [1, 0, 2]}`` gives ``{"prompt": p, "completion": b,
    "label": True}`` then ``{"prompt": p, "completion": c, "label": False}``, in the order of the responses.
    """
    best, worst = min(fields["ranks"]), max(fields["ranks"])
    return [
        {"prompt": fields["prompt"], "completion": response, "label": rank == best}
        for response, rank in zip(fields["responses"], fields["ranks"], strict=True)
        if rank in (best, worst)
    ]


def validate_unpaired(record: Mapping[str, Any]) -> dict[str, Any]:
    """KTO's unpaired feedback (TRL's format): ``{"prompt", "completion", "label": true|false}``, true for a
    desirable completion. A comparison record (``validate_comparison``'s shapes) is read as the records
    ``unpaired_from_comparison`` makes of it. Either way the fields are ``{"prompt", "responses", "desirable"}``:
    the prompt's completions and, for each, 1 (desirable) or 0."""
    if not any(name in record for name in ("completion", "label")):
        if any(name in record for name in ("responses", "ranks", "chosen", "rejected")):
            unpaired = unpaired_from_comparison(validate_comparison(record))
            return {
                "prompt": unpaired[0]["prompt"],
                "responses": [r["completion"] for r in unpaired],
                "desirable": [int(r["label"]) for r in unpaired],
            }
        raise RecordError(
            "fields 'completion' and 'label' are missing: an unpaired record is {'prompt', 'completion', 'label': "
            "true|false} (or a comparison, read as its best response desirable and its worst undesirable)"
        )
    prompt = _check_text_or_messages(record, "prompt", EMPTY_PROMPT)
    completion = _check_text_or_messages(record, "completion")
    label = record.get("label")
    if not isinstance(label, bool):
        raise RecordError(
            f"field 'label' must be true (a desirable completion) or false (an undesirable one), got {label!r}"
        )
    return {"prompt": prompt, "responses": [completion], "desirable": [int(label)]}


VALIDATORS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "demonstration": validate_demonstration,
    "comparison": validate_comparison,
    "prompt": validate_prompt,
    "text": validate_text,
    "scored": validate_scored,
    "unpaired": validate_unpaired,
}


def _decode(raw: bytes, first: bool) -> str:
    """One line of UTF-8 (a byte-order mark at the start of the file is dropped), or a ``RecordError`` naming the
    byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line)"
        ) from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # Decoded line by line, so that one bad byte is an error of its line (skippable), not of the whole file.
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            location = f"{path} line {number}"
            try:
                line = _decode(raw, first=number == 1)
            except RecordError as err:
                yield location, err
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as err:
                yield location, RecordError(f"invalid JSON ({err.msg} at column {err.colno})")


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise RecordError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: invalid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records (or {{'data': [...]}}), got {type(data).__name__}")
    for number, row in enumerate(data):
        yield f"{path} record {number}", row


def _read_table(rows: Any, name: str) -> Iterator[tuple[str, Any]]:
    for number, row in enumerate(rows):
        yield f"{name} row {number}", row


def read_rows(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Raw rows of ``source`` with their location. A row may be a ``RecordError`` (e.g. a malformed JSON line)."""
    path = Path(source)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise RecordError(f"{path}: not a regular file (a FIFO, socket or device); give a {'/'.join(FILE_TYPES)} file")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            import pyarrow
            import pyarrow.parquet as pq

            try:
                table = pq.ParquetFile(path)
            except pyarrow.ArrowException as err:
                raise RecordError(f"{path}: not a readable Parquet file ({err})") from None
            # Batch by batch: a large file is never one Python list of every row.
            return _read_table((row for batch in table.iter_batches() for row in batch.to_pylist()), str(path))
        raise RecordError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(FILE_TYPES)}")
    import datasets

    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        return _read_table(dataset, f"{path}[{split}]")
    if path.suffix.lower() in FILE_TYPES:
        raise FileNotFoundError(f"{path}: no such file")
    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; say what was tried
        raise RecordError(
            f"{source}: not a file, a saved dataset directory, or a loadable dataset name ({err})"
        ) from err
    return _read_table(dataset, f"{source}[{split}]")


def validated_rows(
    source: str,
    kind: str,
    columns: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    split: str = "train",
) -> Iterator[tuple[str, dict[str, Any] | RecordError]]:
    """``(location, validated fields)`` for each record of ``source`` (arguments as ``read_records``); an invalid
    record raises, or with ``skip_invalid`` comes as ``(location, the RecordError naming it)`` for the caller to count.
    """
    validate = VALIDATORS[kind]
    rename = {source_name: ours for ours, source_name in (columns or {}).items()}
    for location, row in read_rows(resolve_source(source), split):
        try:
            if isinstance(row, RecordError):
                raise row
            if not isinstance(row, Mapping):
                raise RecordError(f"expected a JSON object, got {type(row).__name__}")
            fields = validate({rename.get(key, key): value for key, value in row.items()})
        except RecordError as err:
            if not skip_invalid:
                raise RecordError(f"{location}: {err}") from None
            fields = RecordError(f"{location}: {err}")
        yield location, fields


def read_records(
    source: str,
    kind: str,
    columns: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    split: str = "train",
) -> tuple[list[Record], ReadReport]:
    """Validated records of ``kind`` (see ``VALIDATORS``) from ``source``.

    Args:
        source: file, saved dataset directory or ``datasets`` name; ``toy:NAME`` for the toy data shipped in the
            package (``toy.resolve_source``).
        kind: ``demonstration``, ``comparison``, ``prompt``, ``text``, ``scored`` (a prompt and a response to score,
            which may be empty) or ``unpaired`` (KTO's labelled completions, ``validate_unpaired``).
        columns: our field name -> the source's column name, e.g. ``{"prompt": "question"}``.
        skip_invalid: count and skip invalid records instead of raising.
        split: the split to read from a dataset with several.

    Raises:
        RecordError: on the first invalid record (naming file, record and field), or when nothing is left.
    """
    report = ReadReport(source=source)
    records = []
    for location, fields in validated_rows(source, kind, columns, skip_invalid, split):
        if isinstance(fields, RecordError):
            report.skipped += 1
            report.reasons.append(str(fields))
        else:
            records.append(Record(location, fields))
    report.kept = len(records)
    if not records:
        what = "no records" if not report.skipped else f"no valid records ({report.skipped} skipped)"
        raise RecordError(f"{source}: {what} of kind {kind!r}")
    return records, report
