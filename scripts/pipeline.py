"""The README's main job: ``lightning-rlhf pipeline`` (``lightning_rlhf/commands/pipeline/loop.py``, whose ``--help``
says what it runs; docs/pipeline_internals.md, each stage), writing under this clone's ``outputs/`` unless
``--outputs`` says otherwise.

    python scripts/pipeline.py                     # the toy task: one seed, one round, about 5 minutes on 2 CPU cores
    python scripts/pipeline.py --seeds 0 1 2       # three seeds: the README's means and spreads
"""

import sys
from pathlib import Path

from lightning_rlhf.cli import main

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    main(["pipeline", "--outputs", str(REPO / "outputs"), *sys.argv[1:]])  # a later --outputs wins
