"""What the same pipeline command run again skips and resumes. Each stage has a manifest,
``pipeline/stages/<stage>.json``: its command and a digest of every input file or directory it names, written when it
starts (with what older runs left to resume from) and marked finished when it exits 0. Run again, a stage whose
manifest is finished, with the same command and inputs and its output there, is skipped; one stopped part-way
resumes (``fit`` from its ``last.ckpt``, ``sample`` from its partial output); a changed command or input runs it
again from the start, and the stages downstream with it (their input, its output, changed). Each prints one line
saying which, and why. ``--restart`` ignores the manifests."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from lightning_rlhf.io import write_json_atomic


def option(argv: list[str], name: str) -> str | None:
    """The value of ``name`` in ``argv``, given as ``name=value`` or ``name value`` (``None``: not given)."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def output_of(argv: list[str]) -> Path:
    """What a stage's command writes last: a ``fit``'s export, a ``sample``'s output file."""
    return Path(option(argv, "--model.init_args.export_dir") or option(argv, "--output"))


def digest(path: Path) -> str:
    """A file's SHA-256; a directory's over its files' names, sizes and modification times (a model directory is
    large, and rewritten only when the stage that exports it ran again)."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    files = sorted(file for file in path.rglob("*") if file.is_file())
    listed = "\n".join(f"{file.relative_to(path)} {file.stat().st_size} {file.stat().st_mtime_ns}" for file in files)
    return hashlib.sha256(listed.encode()).hexdigest()


def settings(argv: list[str]) -> dict:
    """A stage's command and the digest of each file or directory it names that exists, other than its output and
    the directories holding it (its run directory, where its logs and checkpoints go)."""
    output = output_of(argv).resolve()
    named = [
        Path(arg.split("=", 1)[1] if arg.startswith("--") else arg) for arg in argv if "=" in arg or arg[:2] != "--"
    ]
    inputs = {}
    for path in named:
        resolved = path.resolve()
        if path.exists() and not (resolved.is_relative_to(output) or output.is_relative_to(resolved)):
            inputs[str(path)] = digest(path)
    return {"argv": argv, "inputs": inputs}


def what_changed(before: dict, now: dict) -> str:
    """Why ``now``'s settings are not ``before``'s, in a few words."""
    added = [arg for arg in now["argv"] if arg not in before["argv"]]
    dropped = [arg for arg in before["argv"] if arg not in now["argv"]]
    if added or dropped:
        return f"its command changed ({' '.join(added) or 'nothing'} in place of {' '.join(dropped) or 'nothing'})"
    changed = [path for path, value in now["inputs"].items() if before["inputs"].get(path) != value]
    gone = [path for path in before["inputs"] if path not in now["inputs"]]
    return f"its input {', '.join(changed + gone)} changed"


def leftovers(argv: list[str]) -> dict[str, int]:
    """What a run of ``argv`` stopped part-way leaves to resume from, with its modification time (ns): a ``fit``'s
    ``last.ckpt`` in each TensorBoard version's ``checkpoints/``, a ``sample``'s partial output."""
    if argv[0] == "fit":
        paths = list(Path(option(argv, "--trainer.default_root_dir")).glob("**/checkpoints/last.ckpt"))
    else:
        paths = [output_of(argv).with_name(output_of(argv).name + ".partial")] if "--restart" in argv else []
    return {str(path): path.stat().st_mtime_ns for path in paths if path.is_file()}


def resumed(argv: list[str], before: dict[str, int]) -> tuple[list[str], str] | None:
    """``argv`` continuing a run of it that stopped, and from what: its newest leftover (``leftovers``) not among
    ``before``, those there when that run started (an older run's); ``None`` when there is none. A ``fit`` from that
    ``last.ckpt``, logging to its TensorBoard version; a ``sample`` from its partial output, without ``--restart``."""
    new = {path: mtime for path, mtime in leftovers(argv).items() if before.get(path) != mtime}
    if not new:
        return None
    last = max(new, key=new.get)
    if argv[0] == "fit":
        version = Path(last).parent.parent.name
        return [*argv, f"--ckpt_path={last}", f"--trainer.logger.init_args.version={version}"], last
    return [arg for arg in argv if arg != "--restart"], last


@dataclass(frozen=True)
class Manifests:
    """The stages' manifests in ``directory`` (``pipeline/stages``); ``restart``: ignore the ones there."""

    directory: Path
    restart: bool = False

    def path(self, stage: str) -> Path:
        return self.directory / f"{stage}.json"

    def to_run(self, stage: str, argv: list[str]) -> list[str] | None:
        """The command that runs or resumes ``stage`` now (its manifest written as started), ``None`` when it is
        done; all but a first run print one line that says which, and why."""
        now, path = settings(argv), self.path(stage)
        before = None if self.restart or not path.exists() else json.loads(path.read_text())
        why = None
        if before is None:
            pass
        elif before["settings"] != now:
            why = what_changed(before["settings"], now)
        elif before["finished"] and output_of(argv).exists():
            print(f"stage {stage}: done, skipped (same command and inputs as {path})", flush=True)
            return None
        elif before["finished"]:
            why = f"its output {output_of(argv)} is missing"
        elif (continued := resumed(argv, before["leftovers"])) is not None:
            print(f"stage {stage}: stopped before it finished, resumes from {continued[1]}", flush=True)
            return continued[0]
        else:
            why = "it stopped before it finished, with nothing saved to resume from"
        if why:
            print(f"stage {stage}: runs again from the start, {why}", flush=True)
        write_json_atomic({"settings": now, "leftovers": leftovers(argv), "finished": None}, path)
        return argv

    def finished(self, stage: str) -> None:
        """Mark ``stage``'s manifest finished: it exited 0."""
        manifest = json.loads(self.path(stage).read_text())
        write_json_atomic(manifest | {"finished": time.time()}, self.path(stage))
