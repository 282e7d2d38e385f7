"""The "what fits" table, from ``lightning_rlhf.training.memory.estimate_memory`` (an estimate, not a measurement).

    python scripts/memory_table.py

Per Llama-shaped model and stage, the estimated GiB per rank before any activation: float32 master weights with
``bf16-mixed`` (AdamW, full fine-tuning), on 1 GPU and on 8 GPUs under FSDP2, and the same with LoRA (adapters
counted as nothing trained; DPO's and PPO's reference is then the policy with its adapter off: no copy), and on 8 GPUs
under FSDP2 with CPU offload (``FSDP2Strategy(cpu_offload=True)``: GPU GiB, then the host GiB each rank offloads).
✓: under 80% of an H100's 79.6 GiB, the rest left for what is not counted. PPO: policy and value model trained,
reference and reward model frozen, 8 prompts × 1 response of 512 + 256 tokens sampled per rank in bf16. Reward and
value models are counted as the causal LM (their head is smaller than the unembedding it replaces).
"""

from __future__ import annotations

from lightning_rlhf.training.memory import GIB, Generation, Layout, ModelCount, estimate_memory, offloaded_memory

H100 = 79.6 * GIB  # 80 GB cards report about 79.6 GiB
ROOM = 0.8  # the rest for activations, logits, the CUDA context and fragmentation, which are not counted
# name: (parameters, layers, KV heads, head dim), from the published configs
MODELS = {
    "1B (Llama-3.2-1B)": (1.24e9, 16, 8, 64),
    "3B (Llama-3.2-3B)": (3.21e9, 28, 8, 128),
    "8B (Llama-3.1-8B)": (8.03e9, 32, 8, 128),
    "13B (Llama-2-13B)": (13.0e9, 40, 40, 128),
    "70B (Llama-3.1-70B)": (70.6e9, 80, 8, 128),
}
STAGES = {  # (trained, frozen) model counts, and whether the stage samples
    "SFT": (1, 0, False),
    "RM": (1, 0, False),
    "DPO": (1, 1, False),
    "PPO": (2, 2, True),
}


def total(parameters: int, shape: tuple, stage: str, ranks: int, lora: bool = False, offload: bool = False) -> float:
    """GiB per rank on the GPU; with ``offload``, ``(GPU, host)``."""
    trained, frozen, samples = STAGES[stage]
    models = [ModelCount(f"trained {i}", parameters, 0 if lora else parameters, 4) for i in range(trained)]
    frozen -= 1 if lora and frozen else 0  # the reference is the policy with its adapter off
    models += [ModelCount(f"frozen {i}", parameters, 0, 4) for i in range(frozen)]
    _, layers, kv_heads, head_dim = shape
    generation = Generation(8, 768, layers, kv_heads, head_dim, 2, parameters) if samples else None
    layout = Layout(ranks, ranks > 1, offload)
    device = sum(estimate_memory(models, layout, generation).values()) / GIB
    return (device, sum(offloaded_memory(models, layout).values()) / GIB) if offload else device


def cell(gib: float) -> str:
    return f"{gib:,.0f} {'✓' if gib * GIB <= ROOM * H100 else '✗'}"


def main() -> None:
    columns = ["1 H100", "1 H100, LoRA", "8 H100 FSDP2", "8 H100 FSDP2, LoRA", "8 H100 FSDP2, offload: GPU / host"]
    print("| model | stage | " + " | ".join(columns) + " |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, shape in MODELS.items():
        parameters = int(shape[0])
        for stage in STAGES:
            cells = [
                total(parameters, shape, stage, 1),
                total(parameters, shape, stage, 1, lora=True),
                total(parameters, shape, stage, 8),
                total(parameters, shape, stage, 8, lora=True),
            ]
            device, host = total(parameters, shape, stage, 8, offload=True)
            offloaded = f"{cell(device)} / {host:,.0f}"
            print(f"| {name} | {stage} | " + " | ".join(cell(c) for c in cells) + f" | {offloaded} |")


if __name__ == "__main__":
    main()
