"""JSON Lines written as the work finishes, kept through an interruption and continued by the next run.

``sample`` and ``score`` append each finished batch of records to ``<output>.partial`` and, every
``COMMIT_SECONDS`` and when stopped by an error or Ctrl-C, make it durable: the records are flushed and fsynced,
then ``<output>.partial.json`` is replaced atomically by the run's settings and how far it got (inputs done, bytes
of records, counters). The state never claims more than the disk holds, so a rerun with the same settings cuts the
records back to the committed size (a crash, even ``kill -9``, can leave half a line after it) and continues with
the next input; a rerun with other settings is refused, and so is a second run while the first lasts (a lock on
the partial file). When all is done the records are renamed over
``<output>``: a finished output is never a half-written file, and the state file goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_rlhf.io import atomic_file

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

COMMIT_SECONDS = 10.0  # at most this much finished work is lost to a crash


def digest(value: Any) -> str:
    """A short SHA-256 of ``value``'s JSON: stands for the inputs in the settings."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def fingerprint(source: str | None) -> Any:
    """A model directory as its resolved path and the size and modification time of each file directly in it (a
    model trained again into the same directory is another model); anything else (``gold``, a function's import
    path) stands for itself."""
    if source is None or not Path(source).is_dir():
        return source
    files = sorted(p for p in Path(source).resolve().iterdir() if p.is_file())
    return {
        "path": str(Path(source).resolve()),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


class ResumableJsonl:
    """Records of a long run, appended to ``<output>.partial`` in input order; see the module docstring.

    Use as a context manager and call ``finish`` at the end; leaving the block without it (an error, Ctrl-C)
    commits what was appended (``close``). ``done`` (inputs finished) and ``counts`` (the caller's counters) are where a
    previous run with the same ``settings`` stopped, 0 and ``{}`` for a fresh start (always with ``restart``, which
    discards a previous run's records).
    """

    def __init__(self, output: str | os.PathLike, settings: dict[str, Any], restart: bool = False):
        self.output = Path(output).resolve()
        self.records_path = self.output.with_name(self.output.name + ".partial")
        self.state_path = self.output.with_name(self.output.name + ".partial.json")
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the state file
        self.done, self.counts, self.size = 0, {}, 0
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.records_path.open("ab")
        try:
            self._lock()
            if restart:
                self.state_path.unlink(missing_ok=True)  # and the records are cut to nothing below
            if self.state_path.exists():
                self._resume()
        except BaseException:
            self.file.close()
            raise
        self.file.truncate(self.size)  # records past the last commit are incomplete; without a state file, all are
        self.file.seek(self.size)
        self.committed_at = time.monotonic()

    def _lock(self) -> None:
        """Refuse a second run on the same output while this one lasts: both would append to one file."""
        if fcntl is None:  # not on POSIX (Windows): unguarded
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                f"{self.records_path}: another run is writing it now; wait for that run or stop it first"
            ) from None

    def _resume(self) -> None:
        start_over = f"pass --restart (or delete {self.records_path} and {self.state_path}) to start over"
        try:
            state = json.loads(self.state_path.read_text())
            settings, done, size, counts = state["settings"], state["done"], state["size"], state["counts"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.state_path}: not a state file of this package ({err}); {start_over}") from None
        if settings != self.settings:
            changed = "; ".join(
                f"{key}: {settings.get(key)!r} then, {self.settings.get(key)!r} now"
                for key in sorted(settings.keys() | self.settings.keys())
                if settings.get(key) != self.settings.get(key)
            )
            raise ValueError(
                f"{self.records_path} holds the first {done} results of a run with other settings ({changed}): "
                f"rerun with that run's arguments to continue it, or {start_over}"
            )
        held = self.records_path.stat().st_size if self.records_path.exists() else 0
        if held < size:
            raise ValueError(f"{self.records_path} holds {held} bytes but {size} were committed; {start_over}")
        self.done, self.counts, self.size = done, counts, size

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def append(self, rows: Iterable[dict], done: int, counts: dict[str, int] | None = None) -> None:
        """Append ``rows``, the results of inputs up to ``done`` (exclusive); ``counts`` replaces the counters."""
        self.file.write(b"".join((json.dumps(row, ensure_ascii=False) + "\n").encode() for row in rows))
        self.file.flush()
        self.done, self.counts, self.size = done, dict(counts or {}), self.file.tell()
        if time.monotonic() - self.committed_at >= COMMIT_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Make everything appended durable, then record how far it goes."""
        os.fsync(self.file.fileno())
        with atomic_file(self.state_path) as out:
            json.dump({"settings": self.settings, "done": self.done, "size": self.size, "counts": self.counts}, out)
        self.committed_at = time.monotonic()

    def finish(self) -> Path:
        """Rename the complete records over the output (atomically) and remove the state; returns the output."""
        os.fsync(self.file.fileno())
        # The state goes first: a crash in between leaves records without state, which a rerun starts over from.
        # The file stays open, and locked, until it is renamed.
        self.state_path.unlink(missing_ok=True)
        os.replace(self.records_path, self.output)
        self.file.close()
        directory = os.open(self.output.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return self.output

    def close(self) -> None:
        """Commit what was appended; a run stopped before finishing any input leaves no files (nothing to keep, and
        no settings to hold a corrected rerun to)."""
        if self.file.closed:
            return
        if self.done == 0:  # removed while still locked
            self.records_path.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)
            self.file.close()
            return
        try:
            self.commit()
        finally:
            self.file.close()
