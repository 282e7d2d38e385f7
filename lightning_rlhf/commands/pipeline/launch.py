"""How a stage's ``lightning-rlhf`` command runs: in a fresh process (``in_new_process``), or forked from a warm one
that imported the framework once (``warm``); and ``side_by_side``, which runs the commands of stages that need none
of each other's outputs at once, each on its share of the cores."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
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


def in_new_process(program: tuple[str, ...] = LIGHTNING_RLHF) -> Launcher:
    """Each command a fresh ``program`` (``python -m lightning_rlhf``), its share of the cores as OMP_NUM_THREADS."""

    def launch(argv: list[str], threads: int | None, log: Path | None) -> int:
        env = stage_environment(threads)
        with log.open("w") if log else contextlib.nullcontext() as out:
            err = subprocess.STDOUT if out else None
            return subprocess.run([*program, *argv], env=env, stdout=out, stderr=err).returncode

    return launch


class ParentStream:
    """This process's file descriptor ``fd`` (1: stdout, 2: stderr) as a warm stage receives it: a duplicate sent with
    the process, as multiprocessing sends a ``Connection`` (the forked process's own are the forkserver's, where this
    process's output went when it started the forkserver)."""

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
) -> None:
    """A stage in its process forked from the warm one (``warm``): stdout and stderr to ``output`` (a log file, or
    the launching process's streams as ``ParentStream`` delivers them), the launching process's ``environment`` as
    it is now (``stage_environment``; the forkserver's is as it was when it started), ``threads`` threads (torch read
    OMP_NUM_THREADS when the forkserver imported it), then ``entry(argv)``; its ``SystemExit`` status is the
    process's."""
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
        process = context.Process(target=forked_stage, args=(entry, argv, threads, output, environment))
        process.start()
        process.join()
        return process.exitcode

    return launch


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def side_by_side(commands: dict[str, list[str]], jobs: int, logs: Path, launch: Launcher) -> dict[str, float]:
    """Run the ``lightning-rlhf`` commands of stages that need none of each other's outputs, at most ``jobs`` at once,
    each with its share of the cores; returns each stage's wall time. One command at a time writes to this terminal;
    several write to ``logs/<stage>.log``, and a failure names its log and shows its end, once the others have
    finished.

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
        return time.perf_counter() - start

    if alone:
        return {stage: one(stage, args) for stage, args in commands.items()}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {stage: pool.submit(one, stage, args) for stage, args in commands.items()}
    return {stage: future.result() for stage, future in futures.items()}
