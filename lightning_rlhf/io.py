"""Files that are never half-written: atomic writes (a temporary sibling renamed over the target), checks that an
output can be written before work starts, and the marker that says an export directory is ours to replace."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from matplotlib.figure import Figure

EXPORT_MARKER = ".lightning_rlhf_export"  # in every export we write: a directory without it is not ours to replace


class ExportError(ValueError):
    """An export target that would destroy what we did not write, or that cannot be written."""


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _staging_dirs(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.tmp-*")) + sorted(target.parent.glob(f".{target.name}.old-*"))


def recover_export(directory: str | os.PathLike) -> None:
    """Finish or undo an export that a kill interrupted: put a previous export moved aside back when the target is
    missing (the kill fell between the two renames), and remove staging directories of ours that are left over."""
    target = Path(directory).resolve()
    if not target.parent.is_dir():
        return
    for leftover in _staging_dirs(target):
        if leftover.is_dir() and (not any(leftover.iterdir()) or (leftover / EXPORT_MARKER).exists()):
            if leftover.name.startswith(f".{target.name}.old-") and not target.exists():
                leftover.rename(target)  # the previous, complete export
                fsync_path(target.parent)
            else:
                shutil.rmtree(leftover)


def check_export_target(directory: str | os.PathLike, run_dirs: list[str | os.PathLike] = ()) -> Path:
    """Refuse an export target that an export could damage, before any work is done; returns the resolved path.

    The target must not be a file, nor a non-empty directory that is not an earlier export of ours (recognised by
    ``EXPORT_MARKER``), nor the working directory or the run's own directories (``run_dirs``: logs, checkpoints) or a
    directory holding them; its parent must be writable. Interrupted earlier exports are recovered first.
    """
    target = Path(directory).resolve()
    run = [(Path(d), "a directory of the run (logs, checkpoints)") for d in run_dirs]
    for path, what in [(Path.cwd(), "the working directory"), *run]:
        if _is_within(path.resolve(), target):
            raise ExportError(
                f"export_dir={str(directory)!r} would replace {path}, {what}: give the export a directory of its own "
                "(e.g. <root>/hf)"
            )
    if reason := unwritable_reason(target.parent):
        raise ExportError(f"export_dir={str(directory)!r} cannot be written ({reason})")
    recover_export(target)
    if target.exists() and not target.is_dir():
        raise ExportError(f"export_dir={str(directory)!r} is a file: give a directory for the export")
    if target.is_dir() and any(target.iterdir()) and not (target / EXPORT_MARKER).exists():
        raise ExportError(
            f"export_dir={str(directory)!r} is a non-empty directory that no export of ours wrote "
            f"(no {EXPORT_MARKER}): refusing to replace it; give a new or empty directory (an export written before "
            "the marker existed: delete it first)"
        )
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """An open temporary sibling of ``path``, renamed over it when the block ends without an error (removed if it
    raises): a reader never sees a half-written file, and an earlier complete one survives a crash."""
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from everyone else
        os.replace(staging, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def unwritable_reason(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (created if missing), or ``None`` when one can."""
    blocking = next((p for p in [directory, *directory.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"{blocking} is a file, not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        return f"{err.strerror}: {err.filename or directory}"
    return None


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse an output path that cannot be written, before the work that produces it: a directory, or a place where
    no file can be created. Creates missing parent directories; returns the resolved path."""
    target = Path(path).resolve()
    if target.is_dir():
        raise OSError(f"--output {path}: is a directory; give a file name")
    if reason := unwritable_reason(target.parent):
        raise OSError(f"--output {path}: cannot be written ({reason})")
    return target


def write_jsonl_atomic(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write ``rows`` as JSON Lines to a temporary sibling, then rename it over ``path``."""
    with atomic_file(path) as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return Path(path).resolve()


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """``data`` as indented JSON, written to a temporary sibling and renamed over ``path``."""
    with atomic_file(path, "w") as out:
        json.dump(data, out, indent=2)
    return Path(path).resolve()


def save_figure_atomic(figure: Figure, path: str | os.PathLike) -> Path:
    """Save ``figure`` (format from the suffix, default PNG) to a temporary sibling and rename it over ``path``."""
    with atomic_file(path, "wb") as out:
        figure.savefig(out, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return Path(path).resolve()
