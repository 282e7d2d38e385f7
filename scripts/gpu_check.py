"""The first thing to run on a machine with GPUs: the GPU tests, every sharded configuration for a few steps, and the
benchmarks, written to one report.

    python scripts/gpu_check.py                      # everything; report in outputs/gpu_check/report.md (+ .json)
    python scripts/gpu_check.py --skip-benchmarks    # tests and configurations only (a few minutes)

1. ``pytest -m gpu``: the distributed tests on NCCL with 1 and 2 devices (2 needs two GPUs), FSDP1, bf16, DPO
   without host-device synchronisation, generation on CUDA.
2. Each stage under sharding on every visible GPU for a few steps through the CLI, from tiny random exports:
   ``configs/sft_fsdp.yaml`` (FSDP1), ``configs/ppo_fsdp2.yaml`` (FSDP2, bf16 mixed), and ``sft.yaml``, ``rm.yaml``,
   ``dpo.yaml`` under FSDP2 in bf16 mixed precision, ``ppo_fsdp2.yaml`` again with CPU offload and activation
   checkpointing; then sharded loading of a 1.2B float32 checkpoint under FSDP2: seconds and peak host RSS per rank,
   and SFT of a 0.5B model two steps without and with CPU offload: peak GPU memory, seconds per step, losses (each
   step's JSON at the end of its output).
3. ``scripts/benchmark.py`` in bf16 on the random-init Llama configurations of issue 12 (0.5B: width 1024, 24
   layers; 1B: width 2048, 16 layers; vocabulary 32k) with full-length synthetic records: tokens/s, MFU against
   the card's bf16 peak, peak memory, and TRL beside ours where ``trl`` is installed; our SFT packed vs padded on
   demonstrations of mixed lengths; rollout generation with the dynamic cache, the static cache and static +
   compile; DPO with LoRA and the adapter-off reference beside full DPO (``--lora``). Each benchmark's rows are also
   written as JSON (``benchmark.py --json``) to ``benchmarks/<name>.json`` beside the report.
4. Where ``vllm`` is installed: ``tests/test_vllm.py`` on CUDA, and the rows that settle the vLLM engine's claim:
   sampled tokens/s of the vllm engine beside ``generate``'s, and GRPO episodes/s ours on hf, ours on vLLM and TRL's
   ``GRPOTrainer(use_vllm=True, vllm_mode="colocate")`` at the same model, G, lengths and batch.

Every step runs in its own process; a failure is recorded and the next step still runs. The report names the card.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_rlhf.io import atomic_file

if __package__:  # imported as scripts.gpu_check (the tests)
    from .benchmarks.common import export_random_llama
else:  # run as a script: scripts/ is on the path
    from benchmarks.common import export_random_llama

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--hidden-size", "1024", "--layers", "24", "--vocab-size", "32000"]  # about 0.5B parameters
LARGE = ["--hidden-size", "2048", "--layers", "16", "--vocab-size", "32000"]  # about 1.2B parameters
BENCHMARKS = {  # the shapes of issue 12's TRL reference points
    "sft 0.5B bs 8 x 512": ["sft", *SMALL, "--batch-size", "8", "--max-length", "512"],
    "sft packed vs padded 0.5B bs 8 x 512, lengths 10-500": [
        "sft",
        *SMALL,
        "--batch-size",
        "8",
        "--max-length",
        "512",
        "--packing",
        "--mixed-lengths",
    ],
    "rm 0.5B bs 8 x 512": ["rm", *SMALL, "--batch-size", "8", "--max-length", "512"],
    "dpo 0.5B bs 8 x 512, full and LoRA": ["dpo", *SMALL, "--batch-size", "8", "--max-length", "512", "--lora"],
    "dpo 1B bs 4 x 1024": ["dpo", *LARGE, "--batch-size", "4", "--max-length", "1024"],
    "ppo 0.5B bs 16, prompt 64, response 128": [
        "ppo",
        *SMALL,
        "--batch-size",
        "16",
        "--max-length",
        "64",
        "--max-new-tokens",
        "128",
    ],
    "generate 0.5B bs 16, prompt 64, response 128": [
        "generate",
        *SMALL,
        "--batch-size",
        "16",
        "--max-length",
        "64",
        "--max-new-tokens",
        "128",
    ],
    "generate 0.5B, 8 samples of 8 prompts of 512, response 64, each row vs each prompt prefilled": [
        "generate",
        *SMALL,
        "--shared-prompt",
        "--num-generations",
        "8",
        "--batch-size",
        "64",
        "--prompt-length",
        "512",
        "--max-length",
        "640",
        "--max-new-tokens",
        "64",
    ],
}
VLLM_BENCHMARKS = {  # where vLLM is installed: the engine's GPU claim, against generate and against TRL with vLLM
    "generate 0.5B bs 16, prompt 64, response 128, hf vs vllm": [
        "generate",
        *SMALL,
        "--batch-size",
        "16",
        "--max-length",
        "64",
        "--max-new-tokens",
        "128",
        "--variants",
        "dynamic",
        "--engine",
        "vllm",
    ],
    "grpo 0.5B bs 16 (G 4), prompt 64, response 128: ours hf / ours vllm / TRL GRPOTrainer vllm colocate": [
        "ppo",
        *SMALL,
        "--batch-size",
        "16",
        "--max-length",
        "64",
        "--max-new-tokens",
        "128",
        "--estimators",
        "grpo",
        "--num-generations",
        "4",
        "--engine",
        "vllm",
    ],
}


def run(name: str, command: list[str], timeout: int) -> dict:
    """Run ``command`` from the repository root; its outcome, time and the end of its output."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = "timeout", f"{expired.stdout or ''}{expired.stderr or ''}"
    seconds = time.perf_counter() - start
    print(f"   -> {code} in {seconds:.0f} s", flush=True)
    return {"name": name, "command": command, "returncode": code, "seconds": round(seconds, 1), "output": output}


def tiny_exports(root: Path) -> tuple[str, str]:
    """A small random SFT export (tied embeddings, as Llama-3.2 and small Qwen2.5 have) and a reward model from it."""
    from lightning_rlhf.data.tokenizer import load_tokenizer
    from lightning_rlhf.models.export import export_pretrained
    from lightning_rlhf.models.reward import load_reward_model

    sft = export_random_llama(root / "start" / "sft", {"tie_word_embeddings": True})
    tokenizer = load_tokenizer(None)
    return sft, str(export_pretrained(load_reward_model(sft, tokenizer), tokenizer, root / "start" / "rm"))


def config_runs(root: Path, devices: int) -> dict[str, list[str]]:
    """A few steps of each sharded configuration on ``devices`` GPUs, every output under ``root``."""
    sft, rm = tiny_exports(root)
    cli = [sys.executable, "-m", "lightning_rlhf", "fit"]
    fsdp2 = [
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        f"--trainer.strategy.init_args.data_parallel_size={devices}",
        "--trainer.strategy.init_args.tensor_parallel_size=1",
        "--trainer.precision=bf16-mixed",
    ]

    def common(name: str) -> list[str]:
        out = root / name
        return [
            "--trainer.accelerator=gpu",
            f"--trainer.devices={devices}",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            f"--model.init_args.export_dir={out / 'hf'}",
        ]

    return {
        "sft_fsdp.yaml (FSDP1, bf16-mixed)": [
            *cli,
            "--config",
            "configs/sft_fsdp.yaml",
            *common("sft_fsdp"),
            f"--model.init_args.model_name_or_path={sft}",
        ],
        "ppo_fsdp2.yaml (FSDP2, bf16-mixed)": [
            *cli,
            "--config",
            "configs/ppo_fsdp2.yaml",
            *common("ppo_fsdp2"),
            f"--trainer.strategy.init_args.data_parallel_size={devices}",
            f"--model.init_args.model_name_or_path={sft}",
            f"--model.init_args.reward_model_name_or_path={rm}",
        ],
        "ppo_fsdp2.yaml (FSDP2, bf16-mixed, cpu_offload, gradient_checkpointing)": [
            *cli,
            "--config",
            "configs/ppo_fsdp2.yaml",
            *common("ppo_fsdp2_offload"),
            f"--trainer.strategy.init_args.data_parallel_size={devices}",
            "--trainer.strategy.init_args.cpu_offload=true",
            "--model.init_args.gradient_checkpointing=true",
            f"--model.init_args.model_name_or_path={sft}",
            f"--model.init_args.reward_model_name_or_path={rm}",
        ],
        "sft.yaml under FSDP2": [
            *cli,
            "--config",
            "configs/sft.yaml",
            *common("sft"),
            *fsdp2,
            f"--model.init_args.model_name_or_path={sft}",
        ],
        "rm.yaml under FSDP2": [
            *cli,
            "--config",
            "configs/rm.yaml",
            *common("rm"),
            *fsdp2,
            f"--model.init_args.model_name_or_path={sft}",
        ],
        "dpo.yaml under FSDP2": [
            *cli,
            "--config",
            "configs/dpo.yaml",
            *common("dpo"),
            *fsdp2,
            f"--model.init_args.model_name_or_path={sft}",
        ],
    }


def sharded_load_run(root: Path, devices: int) -> list[str]:
    """SFT loading a 1.2B-parameter float32 checkpoint under FSDP2 on every GPU (``tests/sharded_memory_script.py``):
    seconds and peak host RSS growth per rank while loading. Rank 0 reads the checkpoint and the others receive
    their shards (``strategies.Rank0Load``), so no rank but the first should grow by much more than its shard."""
    shape = {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
    }
    checkpoint = export_random_llama(root / "load" / "1b", shape)
    script = str(REPO / "tests" / "sharded_memory_script.py")
    return [
        sys.executable,
        script,
        str(root / "load" / "memory.json"),
        str(root / "load"),
        str(checkpoint),
        str(devices),
        "gpu",
    ]


def offload_run(root: Path, devices: int) -> list[str]:
    """SFT of a 0.5B float32 model in bf16 mixed precision on every GPU, two steps without and two with CPU offload
    (``tests/offload_gpu_script.py``): peak GPU memory over the steps, the model state per rank, where FSDP2 keeps
    it, seconds per step and the losses of each run."""
    shape = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
    }
    checkpoint = export_random_llama(root / "offload" / "sft", shape)
    script = str(REPO / "tests" / "offload_gpu_script.py")
    return [
        sys.executable,
        script,
        str(root / "offload" / "report.json"),
        str(root / "offload"),
        str(checkpoint),
        str(devices),
    ]


def run_benchmark(name: str, benchmark: list[str], results: Path, steps: str, timeout: int) -> dict:
    """One ``scripts/benchmark.py`` run in bf16 on synthetic records; its rows, as ``--json`` wrote them to
    ``results/<name>.json`` (none if it failed)."""
    rows_path = results / (re.sub(r"[^\w.]+", "_", name) + ".json")
    rows_path.unlink(missing_ok=True)  # never a previous run's rows for this one's
    command = [
        sys.executable,
        "scripts/benchmark.py",
        *benchmark,
        "--dtype",
        "bfloat16",
        "--synthetic",
        "--steps",
        steps,
        "--json",
        str(rows_path),
    ]
    step = run(f"benchmark {name}", command, timeout)
    step["results"] = json.loads(rows_path.read_text()) if rows_path.exists() else []
    return step


def record(report: dict, step: dict, path: Path) -> None:
    """Add a finished step (its output cut to the end) to the report and rewrite the report."""
    step["tail"] = step.pop("output")[-3000:]
    report["steps"].append(step)
    write_report(path, report)


def write_report(path: Path, report: dict) -> None:
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"torch {report['torch']}, {report['devices']} GPU(s), {report['date']}",
        "",
        "| step | result | seconds |",
        "|---|---|---|",
    ]
    for step in report["steps"]:
        ok = "pass" if step["returncode"] == 0 else f"FAIL ({step['returncode']})"
        lines.append(f"| {step['name']} | {ok} | {step['seconds']} |")
    lines += [
        "",
        "| benchmark (bf16) | implementation | tokens/s | MFU | episodes/s | peak memory MiB |",
        "|---|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        for row in step.get("results", []):
            mfu = f"{100 * row['mfu']:.1f} %" if "mfu" in row else "-"
            episodes = f"{row['episodes_per_s']:.2f}" if "episodes_per_s" in row else "-"
            lines.append(
                f"| {step['name']} | {row['impl']} | {row['tokens_per_s']:,.0f} | {mfu} | {episodes} | "
                f"{row['peak_mem_mib']:,.0f} |"
            )
    failed = [step for step in report["steps"] if step["returncode"] != 0]
    for step in failed:
        lines += ["", f"## {step['name']} failed", "", "```", step["tail"], "```"]
    with atomic_file(path) as out:
        out.write("\n".join(lines) + "\n")
    with atomic_file(path.with_suffix(".json")) as out:
        json.dump(report, out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/gpu_check/report.md")
    parser.add_argument("--skip-benchmarks", action="store_true")
    parser.add_argument("--steps", default="10", help="timed benchmark steps")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds for each step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a machine with GPUs")
    devices = torch.cuda.device_count()
    report = {
        "device": torch.cuda.get_device_name(),
        "devices": devices,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "steps": [],
    }
    path = (REPO / args.out).resolve()
    record(report, run("pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs"], 3600), path)
    vllm = importlib.util.find_spec("vllm") is not None
    if vllm:  # the engine on CUDA: sync, greedy parity, log-probs, sleep mode, GRPO learning, resume
        record(
            report,
            run("pytest tests/test_vllm.py", [sys.executable, "-m", "pytest", "tests/test_vllm.py", "-q", "-rs"], 3600),
            path,
        )
    else:
        print("vllm not installed: no vLLM tests or rows (pip install -e .[vllm])", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in config_runs(Path(tmp), devices).items():
            record(report, run(name, command, args.timeout), path)
        load = sharded_load_run(Path(tmp), devices)
        record(report, run(f"sharded loading, 1.2B float32 on {devices} GPU(s)", load, args.timeout), path)
        offload = offload_run(Path(tmp), devices)
        record(report, run(f"SFT 0.5B without and with CPU offload on {devices} GPU(s)", offload, args.timeout), path)
    if not args.skip_benchmarks:
        for name, benchmark in {**BENCHMARKS, **(VLLM_BENCHMARKS if vllm else {})}.items():
            record(report, run_benchmark(name, benchmark, path.parent / "benchmarks", args.steps, args.timeout), path)
    print(path.read_text())
    failed = [step["name"] for step in report["steps"] if step["returncode"] != 0]
    raise SystemExit(f"failed: {', '.join(failed)}" if failed else 0)


if __name__ == "__main__":
    main()
