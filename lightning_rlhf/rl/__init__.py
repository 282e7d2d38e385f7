"""Reinforcement learning's moving parts, below the RL LightningModule: generation (KV-cached ``generate``), the
rollout engines (``hf``, ``vllm``), rollout layouts (padded, shared prompt), experience and its advantage estimators,
and sampling many responses per prompt for the ``sample`` / ``evaluate`` commands."""
