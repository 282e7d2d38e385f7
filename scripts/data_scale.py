"""SFT DataModule setup at scale: time and peak RSS on synthetic demonstrations.

    python scripts/data_scale.py generate --records 1000000 --output outputs/data_scale/demos.jsonl
    python scripts/data_scale.py setup --data outputs/data_scale/demos.jsonl --cache-dir outputs/data_scale/cache
    python scripts/data_scale.py compare --records 1000000 --old /tmp/h21old   # old checkout vs this one

``setup`` runs in a fresh process and prints one JSON line: seconds from the DataModule's construction to the end of
``prepare_data`` + ``setup`` (what ``fit`` runs before the first batch), the CPU seconds of the whole process (its
imports included; on a shared machine a fairer comparison than wall time), and peak RSS of the process (and of its
``num_proc`` workers, separately). ``compare`` runs ``setup`` for a checkout given with ``--old`` (the code on its
``PYTHONPATH``; a checkout without a cache runs the same calls) and for this one twice, the first with an empty
cache and the second reading it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LETTERS = string.ascii_lowercase + " "
WHO = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)  # this process and its (num_proc) workers


def generate(records: int, output: Path, seed: int = 0) -> None:
    """``records`` demonstrations: prompts of 20-200 characters, responses of 1-80, seeded."""
    rng = random.Random(seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + ".tmp")
    with staging.open("w") as out:
        for _ in range(records):
            prompt = "".join(rng.choices(LETTERS, k=rng.randint(20, 200)))
            response = "".join(rng.choices(LETTERS, k=rng.randint(1, 80)))
            out.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    staging.replace(output)


def setup(data: str, cache_dir: str | None, num_proc: int | None, max_length: int) -> dict:
    import lightning_rlhf
    from lightning_rlhf import DemonstrationDataModule

    options = {} if cache_dir is None else {"cache_dir": cache_dir, "num_proc": num_proc}
    start = time.perf_counter()
    module = DemonstrationDataModule(train_path=data, max_length=max_length, **options)
    if hasattr(module, "prepare_data"):
        module.prepare_data()
    module.setup("fit")
    seconds = time.perf_counter() - start
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "code": str(Path(lightning_rlhf.__file__).parent.parent),
        "setup_s": round(seconds, 1),
        "cpu_s": round(sum(getattr(resource.getrusage(who), f) for who in WHO for f in ("ru_utime", "ru_stime")), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib),
        "workers_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib),
        "train_examples": len(module.train_examples),
        "val_examples": len(module.val_examples),
    }


def run_setup(code: Path, data: Path, cache_dir: Path | None, num_proc: int | None, max_length: int) -> dict:
    command = [sys.executable, str(ROOT / "scripts" / "data_scale.py"), "setup", "--data", str(data)]
    command += ["--max-length", str(max_length)]
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)] + (["--num-proc", str(num_proc)] if num_proc else [])
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code)
    if done.returncode != 0:
        raise SystemExit(f"setup with {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> None:
    data = Path(args.data)
    if not data.exists():
        generate(args.records, data)
    cache = Path(args.cache_dir)
    shutil.rmtree(cache, ignore_errors=True)
    rows = {}
    if args.old:
        rows["old (lists)"] = run_setup(Path(args.old), data, None, None, args.max_length)
    rows["new, first run"] = run_setup(ROOT, data, cache, args.num_proc, args.max_length)
    rows["new, cached"] = run_setup(ROOT, data, cache, args.num_proc, args.max_length)
    for name, row in rows.items():
        print(json.dumps({"run": name, **row}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write synthetic demonstrations")
    gen.add_argument("--records", type=int, default=1_000_000)
    gen.add_argument("--output", default="outputs/data_scale/demos.jsonl")
    one = commands.add_parser("setup", help="time one DataModule setup in this process")
    one.add_argument("--data", required=True)
    one.add_argument("--cache-dir")
    one.add_argument("--num-proc", type=int)
    one.add_argument("--max-length", type=int, default=512)
    both = commands.add_parser("compare", help="old checkout vs this one, first and cached run")
    both.add_argument("--records", type=int, default=1_000_000)
    both.add_argument("--data", default="outputs/data_scale/demos.jsonl")
    both.add_argument("--cache-dir", default="outputs/data_scale/cache")
    both.add_argument("--old", help="a checkout of the list-based code (e.g. git worktree add /tmp/h21old main)")
    both.add_argument("--num-proc", type=int)
    both.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.records, Path(args.output))
    elif args.command == "setup":
        print(json.dumps(setup(args.data, args.cache_dir, args.num_proc, args.max_length)))
    else:
        compare(args)


if __name__ == "__main__":
    main()
