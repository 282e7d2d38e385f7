"""A pipeline-like process tree for ``tests/test_pipeline_orphans.py``: two warm stages (forked from the forkserver,
one with a DataLoader worker) and two fresh ones, side by side from two threads, each stage writing its pid and
sleeping; SIGINT and SIGTERM handled as the pipeline handles them (``launch.stop_on_signals``).

    python tests/orphan_tree_script.py DIRECTORY
"""

import json
import os
import sys
import threading
from multiprocessing import resource_tracker
from pathlib import Path

from lightning_rlhf.commands.pipeline.launch import in_new_process, side_by_side, stop_on_signals, warm
from tests.test_pipeline_orphans import SLEEPING_STAGE, sleeping_stage

if __name__ == "__main__":
    directory = Path(sys.argv[1])
    with stop_on_signals(["lightning-rlhf", "pipeline", "--outputs", str(directory)]):
        warm_stages = {name: [name, str(directory)] for name in ("warm_a", "warm_b")}
        fresh_stages = {name: [name, str(directory)] for name in ("fresh_a", "fresh_b")}
        groups = [
            (warm_stages, warm(entry=sleeping_stage)),
            (fresh_stages, in_new_process((sys.executable, "-c", SLEEPING_STAGE))),
        ]
        threads = [
            threading.Thread(target=side_by_side, args=(stages, 2, directory / "logs", launch))
            for stages, launch in groups
        ]
        for thread in threads:
            thread.start()
        while not all((directory / f"{name}.json").exists() for name in (*warm_stages, *fresh_stages)):
            threading.Event().wait(0.1)
        tracker = resource_tracker._resource_tracker._pid
        (directory / "top.json").write_text(json.dumps({"pid": os.getpid(), "resource_tracker": tracker}))
        for thread in threads:
            thread.join()
