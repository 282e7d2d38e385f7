"""Benchmarks: ours vs TRL on the identical model, data and batch shape, as ratios taken in one run; how each stage
is measured: docs/performance_method.md. Every row runs in its own process, so peak memory is its own.

    python scripts/benchmark.py sft --steps 20 --batch-size 8 --max-length 128 --hidden-size 256 --layers 4
    python scripts/benchmark.py sft --packing --mixed-lengths --max-length 512 --steps 10    # ours padded vs packed
    python scripts/benchmark.py rm --steps 20 --batch-size 8 --max-length 128
    python scripts/benchmark.py dpo --lora --steps 5 --warmup 2 --hidden-size 512 --vocab-size 32000
    python scripts/benchmark.py dpo --reference-free --kto --steps 10   # DPO, SimPO, ORPO, KTO: their peak memory
    python scripts/benchmark.py dpo --shared-prompt --num-generations 8 --batch-size 16   # padded vs `shared` rows
    python scripts/benchmark.py ppo --estimators gae grpo rloo --steps 10 --max-new-tokens 64
    python scripts/benchmark.py ppo --estimators grpo --engine vllm --shared-prompt --steps 5   # (pip: vllm)
    python scripts/benchmark.py generate --variants dynamic static static+compile --max-new-tokens 64
    python scripts/benchmark.py logprobs --batch-size 4 --seq-len 512 --vocab 32000

One row alone, in this process (what a run starts each of its processes with):

    python scripts/benchmark.py ppo --row ours --estimator grpo --rollout-engine vllm --layout shared

``--json PATH`` also writes the rows (``impl``, ``tokens_per_s``, ``peak_mem_mib``, …; ours start with
``lightning_rlhf``) to PATH as a JSON list. Without ``trl`` installed the TRL rows are left out, with a note.
The stages live in ``scripts/benchmarks/`` (``cli.STAGES``).
"""

from benchmarks.cli import main

if __name__ == "__main__":
    main(__doc__)
