"""Killing the pipeline ends every process it started: stages forked warm and their DataLoader workers, stages in
fresh processes, the forkserver and multiprocessing's resource tracker (``launch.die_with``, ``launch.watch``); SIGINT
and SIGTERM also print the command that resumes and exit non-zero (``launch.stop_on_signals``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

# A fresh stage: writes its pid, then sleeps (far longer than the test).
SLEEPING_STAGE = (
    "import json, os, sys, time; from pathlib import Path; "
    "Path(sys.argv[2], sys.argv[1] + '.json').write_text(json.dumps({'pid': os.getpid()})); time.sleep(600)"
)


class Sleeping(torch.utils.data.Dataset):
    """One item, which a DataLoader worker takes 600 s to give after writing its pid to ``worker.json``."""

    def __init__(self, path: Path):
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        self.path.write_text(json.dumps({"pid": os.getpid()}))
        time.sleep(600)
        return index


def sleeping_stage(argv: list[str]) -> None:
    """A warm stage (``launch.warm``'s entry): writes its pid and its parent's (the forkserver) to ``NAME.json``; the
    first one then waits on a DataLoader worker that sleeps, the other sleeps itself."""
    name, directory = argv[0], Path(argv[1])
    if name == "warm_a":
        loader = torch.utils.data.DataLoader(Sleeping(directory / "worker.json"), num_workers=1)
        batches = iter(loader)
        while not (directory / "worker.json").exists():
            time.sleep(0.05)
    (directory / f"{name}.json").write_text(json.dumps({"pid": os.getpid(), "forkserver": os.getppid()}))
    if name == "warm_a":
        next(batches)
    time.sleep(600)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's /proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_killing_the_pipeline_ends_every_process_it_started(tmp_path, name):
    """``tests/orphan_tree_script.py`` runs two warm stages (one waiting on a DataLoader worker) and two fresh ones
    from two threads, all sleeping; after the signal ``name`` to it, within 10 s none of them, nor its forkserver or
    resource tracker, is alive; SIGINT and SIGTERM print the command that resumes and exit 128 + the signal.
    Catches the warm stages' ``watch`` removed (the warm stages, their worker, the forkserver and the tracker live
    on: the forkserver waits for its stages, they for nothing), the fresh stages' ``die_with`` removed (they live on,
    reparented to init), and ``stop_on_signals`` removed (no line; SIGINT: the script waits on its threads)."""
    signum = signal.Signals[name]
    top = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "orphan_tree_script.py"), str(tmp_path)],
        cwd=REPO,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "top.json").exists():
        assert top.poll() is None, top.stderr.read()
        assert time.monotonic() < deadline, "the stages did not start in 120 s"
        time.sleep(0.1)
    started = {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    pids = {name: record["pid"] for name, record in started.items() if name != "top"}
    pids |= {"forkserver": started["warm_a"]["forkserver"], "resource_tracker": started["top"]["resource_tracker"]}
    assert set(pids) == {"warm_a", "warm_b", "worker", "fresh_a", "fresh_b", "forkserver", "resource_tracker"}
    assert all(alive(pid) for pid in pids.values())

    top.send_signal(signum)
    status = top.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in pids.items() if alive(pid)]
    if signum != signal.SIGKILL:
        assert status == 128 + signum
        stopped = f"stopped by {name}; the same command resumes: lightning-rlhf pipeline"
        assert f"{stopped} --outputs {tmp_path}" in top.stderr.read()
