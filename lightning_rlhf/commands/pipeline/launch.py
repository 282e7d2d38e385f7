"""How a stage's ``lightning-rlhf`` command runs: in a fresh process (``in_new_process``), or forked from a warm one
that imported the framework once (``warm``); and ``side_by_side``, which runs the commands of stages that need none
of each other's outputs at once, each on its share of the cores. No stage outlives the process that launched it,
however that process ends (``die_with``, ``watch``, ``stop_on_signals``)."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import reduction
from pathlib import Path

LIGHTNING_RLHF = (sys.executable, "-m", "lightning_rlhf")


# How a stage's ``lightning-rlhf`` command runs: ``launch(argv, threads, log)`` -> its exit status; ``threads`` its
# share of the cores (``None``: all of them), ``log`` the file its output goes to (``None``: this terminal).
Launcher = Callable[[list[str], "int | None", "Path | None"], int]


def stage_environment(threads: int | None) -> dict[str, str]:
    """This process's environment as it is now, with a stage's share of the cores as ``OMP_NUM_THREADS``."""
    return os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})


PR_SET_PDEATHSIG = 1  # linux/prctl.h


LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded before any fork


def die_with(parent: int) -> None:
    """In a process just forked from ``parent``: SIGKILL once the thread that forked it ends (Linux's
    PR_SET_PDEATHSIG; that thread waits for the process, so it ends with ``parent``), at once if ``parent`` already
    has (it died before the call)."""
    if LIBC is not None:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def in_new_process(program: tuple[str, ...] = LIGHTNING_RLHF) -> Launcher:
    """Each command a fresh ``program`` (``python -m lightning_rlhf``), its share of the cores as OMP_NUM_THREADS,
    killed when this process ends (``die_with``)."""

    def launch(argv: list[str], threads: int | None, log: Path | None) -> int:
        env, parent = stage_environment(threads), os.getpid()
        with log.open("w") if log else contextlib.nullcontext() as out:
            err = subprocess.STDOUT if out else None
            stage = subprocess.Popen(
                [*program, *argv], env=env, stdout=out, stderr=err, preexec_fn=lambda: die_with(parent)
            )
            return stage.wait()

    return launch


def watch(fd: int) -> None:
    """End this process's group (a warm stage and the processes it started, DataLoader workers among them) once
    ``fd``, the read end of a pipe whose write end only the launching process holds, reads end of file: that process
    has ended, however it ended. A warm stage's parent is the forkserver, which outlives the launching process as long
    as any stage holds its pipe, so a death signal from the parent (``die_with``) would never come."""

    def wait() -> None:
        os.read(fd, 1)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=wait, daemon=True).start()


class ParentStream:
    """This process's file descriptor ``fd`` (1: stdout, 2: stderr, or the pipe ``watch`` reads) as a warm stage
    receives it: a duplicate sent with the process, as multiprocessing sends a ``Connection`` (the forked process's
    own are the forkserver's, where this process's output went when it started the forkserver)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return ParentStream.received, (reduction.DupFd(self.fd),)

    @staticmethod
    def received(duplicate) -> int:
        return duplicate.detach()


def forked_stage(
    entry: Callable[[list[str]], None],
    argv: list[str],
    threads: int | None,
    output: Path | tuple[int, int],
    environment: dict[str, str],
    launcher_alive: int,
) -> None:
    """A stage in its process forked from the warm one (``warm``): in a process group of its own that ends with the
    launching process (``watch`` on ``launcher_alive``), stdout and stderr to ``output`` (a log file, or the launching
    process's streams as ``ParentStream`` delivers them), the launching process's ``environment`` as it is now
    (``stage_environment``; the forkserver's is as it was when it started), ``threads`` threads (torch read
    OMP_NUM_THREADS when the forkserver imported it), then ``entry(argv)``; its ``SystemExit`` status is the
    process's."""
    os.setsid()
    watch(launcher_alive)
    os.environ.clear()
    os.environ.update(environment)
    if isinstance(output, Path):
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        output = (fd, fd)
    for stream, fd in zip((1, 2), output, strict=True):
        os.dup2(fd, stream)
    for fd in set(output):
        os.close(fd)
    if threads:
        import torch

        torch.set_num_threads(threads)
    entry(argv)


def warm(entry: Callable[[list[str]], None]) -> Launcher:
    """Each command in a process forked from one that imported ``lightning_rlhf`` once (multiprocessing's
    ``forkserver``, which never runs a tensor operation, so its children start clean): a fresh
    ``python -m lightning_rlhf`` spends about 5 s of CPU importing torch, Lightning and transformers, once per stage,
    4 of them one after the other in the toy run. ``entry``: what runs a command, ``lightning_rlhf.cli.main`` (the CLI
    passes it in: the pipeline, a layer below the CLI, never imports it)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lightning_rlhf.cli", "lightning_rlhf.commands.pipeline.loop"])

    def launch(argv: list[str], threads: int | None, log: Path | None) -> int:
        output = log or (ParentStream(1), ParentStream(2))
        environment = stage_environment(threads)
        alive, held = os.pipe()  # the stage watches ``alive``; ``held`` closes when this process ends
        try:
            stage_args = (entry, argv, threads, output, environment, ParentStream(alive))
            process = context.Process(target=forked_stage, args=stage_args)
            process.start()
            os.close(alive)
            process.join()
        finally:
            os.close(held)
        return process.exitcode

    return launch


@contextlib.contextmanager
def stop_on_signals(command: list[str]) -> Iterator[None]:
    """While inside: SIGINT (Ctrl-C) or SIGTERM prints one line naming ``command``, the command that resumes, and
    ends this process at once with status 128 + the signal's number; its stages end with it (``die_with``,
    ``watch``), as they do when it is killed outright (SIGKILL)."""

    def stop(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        print(f"\nstopped by {name}; the same command resumes: {shlex.join(command)}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def side_by_side(
    commands: dict[str, list[str]],
    jobs: int,
    logs: Path,
    launch: Launcher,
    finished: Callable[[str], None] = lambda stage: None,
) -> dict[str, float]:
    """Run the ``lightning-rlhf`` commands of stages that need none of each other's outputs, at most ``jobs`` at once,
    each with its share of the cores, calling ``finished(stage)`` as each exits 0; returns each stage's wall time.
    One command at a time writes to this terminal; several write to ``logs/<stage>.log``, and a failure names its
    log and shows its end, once the others have finished.

    On 2 CPU cores the toy's stages are small kernels that a second thread speeds up by only 1.1-1.25x (sampling
    1.2 s vs 1.4 s per 4,096 responses, DPO 13.4 s vs 15.2 s, 600 reward-model steps 43 s vs 54 s), so two stages
    on a core each finish well before the two one after the other on both."""
    alone = len(commands) <= 1 or jobs == 1
    threads = None if alone else max(1, cores() // min(jobs, len(commands)))
    if not alone:
        logs.mkdir(parents=True, exist_ok=True)

    def one(stage: str, args: list[str]) -> float:
        log = None if alone else logs / f"{stage}.log"
        shared = "" if alone else f"  [side by side, {threads} thread(s), log: {log}]"
        print(f"$ lightning-rlhf {' '.join(args)}{shared}", flush=True)
        start = time.perf_counter()
        status = launch(args, threads, log)
        if status and log is None:
            raise SystemExit(
                f"error: lightning-rlhf {args[0]} above failed (exit status {status}); its message is above"
            )
        if status:
            tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
            raise SystemExit(f"error: stage {stage} failed (exit status {status}); {log} ends:\n{tail}")
        finished(stage)
        return time.perf_counter() - start

    if alone:
        return {stage: one(stage, args) for stage, args in commands.items()}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {stage: pool.submit(one, stage, args) for stage, args in commands.items()}
    return {stage: future.result() for stage, future in futures.items()}
