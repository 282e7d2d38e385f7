"""The benchmarks behind ``scripts/benchmark.py``: helpers every stage shares (``common``, ``data``), one module per
stage (``sft``, ``rm``, ``dpo``, ``ppo``, ``generate``, ``logprobs``) and the table of stages with the command line
(``cli``). How the numbers are taken: docs/performance_method.md."""
