"""``lightning-rlhf pipeline``: the whole InstructGPT loop, each stage a ``lightning-rlhf`` command, evaluated on
held-out prompts."""
