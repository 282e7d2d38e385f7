"""Benchmarks: ours vs TRL on the identical model, data and batch shape, as ratios taken in one run.

    python scripts/benchmark.py sft --steps 20 --batch-size 8 --max-length 128 --hidden-size 256 --layers 4
    python scripts/benchmark.py rm --steps 20 --batch-size 8 --max-length 128 --hidden-size 256 --layers 4
    python scripts/benchmark.py ppo --steps 10 --batch-size 8 --max-new-tokens 64 --hidden-size 256 --layers 4
    python scripts/benchmark.py dpo --steps 20 --batch-size 8 --max-length 128 --hidden-size 256 --layers 4
    python scripts/benchmark.py dpo --lora --steps 5 --warmup 2 --hidden-size 512 --layers 4 --vocab-size 32000
    python scripts/benchmark.py logprobs --batch-size 4 --seq-len 512 --vocab 32000
    python scripts/benchmark.py generate --steps 10 --batch-size 8 --max-new-tokens 64 --hidden-size 256 --layers 4
    python scripts/benchmark.py ppo --engine vllm --estimators grpo --steps 5   # + rows sampled by vLLM (pip: vllm)

Every implementation runs in its own subprocess, so peak memory is its own. ``--json PATH`` also writes the rows
(``impl``, ``tokens_per_s``, ``peak_mem_mib``, …; ours start with ``lightning_rlhf``) to PATH as a JSON list.

``sft`` trains the same initial weights (saved once, loaded by both) on the toy demonstrations with the prompt
masked. It reports training tokens/s (real, non-pad tokens), model-FLOPs utilisation (``lightning_rlhf.training.flops``: 6N
per trained token with N the parameters that multiply activations, attention at each sequence's real length, DPO
8N for policy and reference; divided by the card's dense peak for ``--dtype``, or ``--peak-tflops``), and peak
memory (CUDA allocator, or peak RSS on CPU). TRL is skipped, with a note, when it is not installed.
``--synthetic`` trains on random records as long as ``--max-length`` instead of the short toy ones, and
``--vocab-size`` widens the model's vocabulary (the byte tokenizer uses 259 ids of it), e.g. the issue's
random-init Llama configs: ``--hidden-size 1024 --layers 24 --vocab-size 32000`` (0.5B) and
``--hidden-size 2048 --layers 16 --vocab-size 32000`` (1.2B).

``sft --packing`` runs our SFT padded and packed (``DemonstrationDataModule(packing=True)``), each in its own process,
on the same batches; their rows also hold the loss of every step, and the run prints the largest difference between
them. ``--mixed-lengths`` adds to the toy demonstrations as many random ones of 10 to 500 tokens, spread evenly
(give ``--max-length 512``), the mixed-length data packing is for:

    python scripts/benchmark.py sft --packing --mixed-lengths --max-length 512 --steps 10

``rm`` and ``dpo`` train the same initial weights on the same chosen/rejected pairs (the best and the worst response
of each shipped toy comparison): ``RewardModule`` vs TRL's ``RewardTrainer`` (a fresh scalar head on the backbone),
``DPOModule`` vs ``DPOTrainer`` (policy and a live frozen reference, β 0.1, sigmoid loss). Their tokens/s counts the
real tokens of prompt ⊕ chosen and prompt ⊕ rejected, from the pairs' mean length times the pairs trained on, so
both sides are credited the same work per pair.

``dpo --lora`` adds, in the same run, our DPO with LoRA adapters (rank ``--lora-rank`` on every linear layer) and
the reference as the policy with its adapter off, beside our full DPO with a live reference copy: on CPU the peak
RSS includes the process's own baseline (torch, Lightning, transformers imported: several hundred MiB), so pick a
model whose weights and optimiser state outweigh it (e.g. ``--hidden-size 512 --vocab-size 32000``) before reading
the memory ratio. The LoRA row is credited the same model FLOPs per token as the full one.

``ppo`` times PPO iterations (one rollout batch, then 2 epochs × 2 minibatches of updates) and splits each into
sampling, scoring (policy, reference, value and reward forwards) and updating; tokens/s counts the real tokens of
the prompt ⊕ response sequences rolled out. TRL 1.x has no PPOTrainer, so there is no TRL row; instead
``--estimators gae grpo rloo`` compares our advantage estimators in one run on the same sequences per rollout
(gae: --batch-size prompts × 1; a group estimator: --batch-size / G prompts × G, and no value model).

``rm --shared-prompt`` and ``dpo --shared-prompt`` train ours padded and in the shared-prompt layout
(``ComparisonDataModule(shared_prompt=True)``: each prompt once, then its K responses, several prompts per row of
``--row-length`` tokens), each in its own process, on the same batches of K-way comparisons (K =
``--num-generations``): toy prompts with K sampled-looking answers (the reversal, the demonstrations' error, a typo;
ranked by the gold judge), or with ``--prompt-length N`` synthetic prompts of N tokens with responses of
``--max-new-tokens``. Both rows count the same tokens (every prompt ⊕ response, as the padded layout computes them),
so their tokens/s ratio is the step-time ratio; the shared row's ``impl`` says ``shared``, both hold every step's
loss, and the run prints the largest difference between them:

    python scripts/benchmark.py rm --shared-prompt --num-generations 8 --batch-size 64 --max-length 64 \
        --hidden-size 64 --layers 2 --steps 20
    python scripts/benchmark.py dpo --shared-prompt --prompt-length 512 --max-new-tokens 64 --num-generations 8 \
        --batch-size 4 --max-length 640 --row-length 1024

``ppo --shared-prompt`` runs each of ``--estimators`` padded and with ``PPOModule(shared_prompt=True)`` (a group
estimator's G responses to a prompt forwarded as one row, in scoring and in the updates; ``--prompt-length N``:
synthetic prompts of N tokens):

    python scripts/benchmark.py ppo --shared-prompt --estimators grpo --num-generations 8 --batch-size 16 \
        --prompt-length 256 --max-new-tokens 32 --max-length 256

``generate`` times our rollout generation (``rollout.generate``, as PPO and ``sample`` call it) on batches of the toy
prompts (``--synthetic``: prompts of ``--max-length`` bytes) collated as PPO's ``PromptDataModule`` does, sampling
``--max-new-tokens`` at temperature 1 from the same initial model with the same seed, one row per ``--variants``:
the dynamic KV cache, the static one, and the static one with the decode step compiled (``torch.compile``, its
compilation paid in the warm-up steps, whose seconds ``warmup_s`` gives). It reports sampled tokens/s (response
tokens up to EOS) and peak memory. ``generate --shared-prompt`` samples ``--num-generations`` G rows of each prompt (K
samples to rank, a GRPO group), each row prefilled, then each prompt prefilled once (``generate(share_prompts=True)``,
the default):

    python scripts/benchmark.py generate --shared-prompt --num-generations 8 --batch-size 256 --hidden-size 64 \
        --layers 2 --max-new-tokens 16 --steps 10
Measured on a shared 2-core CPU (README, Performance; batch 8, 64 new tokens, float32, one thread): at the embedded
default's size (2 layers × 64 wide) neither pays (static 0.96x, static + compile 0.97x the dynamic cache's tokens/s,
after 35 s of compilation and +120 MiB RSS); at 4 layers × 256 wide static gave 1.15–1.20x and static + compile
1.59–1.86x. On a GPU the decode step of a small model is launch-bound, which compile's CUDA graphs remove.

``logprobs`` isolates the log-prob hot path: ``token_logprobs`` against the naive ``log_softmax(...).gather``
and TRL's ``selective_log_softmax`` (median step time, and the memory needed beyond the inputs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_rlhf.io import atomic_file
from lightning_rlhf.toy import toy_path
from lightning_rlhf.training.flops import FORWARD_PASSES, forward_flops, matmul_params, peak_tflops


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def model_flops(args, model, lengths: list[int], stage: str) -> float:
    """Model FLOPs of training ``stage`` on sequences of these real lengths (``lightning_rlhf.training.flops``)."""
    cfg = model.config
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    forward = forward_flops(matmul_params(model), cfg.num_hidden_layers, width, lengths)
    return FORWARD_PASSES[stage] * forward


def peak(args) -> float | None:
    """Peak TFLOPS of the card for the dtype the benchmark computes in (``--peak-tflops`` overrides)."""
    if args.peak_tflops or args.device != "cuda":
        return args.peak_tflops
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return peak_tflops(torch.cuda.get_device_name(), getattr(torch, args.dtype), tf32)


def make_initial_model(args, directory: Path) -> str:
    from lightning_rlhf.data.tokenizer import load_tokenizer
    from lightning_rlhf.models.causal_lm import load_causal_lm
    from lightning_rlhf.models.export import export_pretrained

    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    config = {
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden_size // 64),
        "num_key_value_heads": max(1, args.hidden_size // 64),
        "max_position_embeddings": max(512, args.max_length),
        "vocab_size": max(args.vocab_size, len(tokenizer)),
    }
    return str(export_pretrained(load_causal_lm(None, tokenizer, "float32", config), tokenizer, directory))


def result(args, name: str, tokens: int, seconds: float, flops: float) -> dict:
    """Throughput of the timed steps; MFU = model FLOPs per second / the card's peak for the dtype used."""
    out = {"impl": name, "tokens_per_s": tokens / seconds, "step_s": seconds / args.steps}
    out["peak_mem_mib"] = peak_memory_mib(args.device)
    if peak(args):
        out["mfu"] = flops / seconds / (peak(args) * 1e12)
    return out


def fit_lightning(args, module, data, steps_per_batch: int = 1, losses: list | None = None) -> tuple[float, list[int]]:
    """Train ``module`` for warmup + steps batches; seconds of the timed steps and the real lengths of the sequences
    they saw. ``steps_per_batch``: optimiser steps per batch (manual optimisation takes several). ``losses``: a list
    to append every step's training loss to."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class Timer(Callback):
        start, end = 0.0, 0.0
        lengths: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                sync(args.device)
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()
            if batch_idx >= args.warmup:
                self.lengths += sequence_lengths(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(args.device)
            self.end = time.perf_counter()
            if losses is not None:
                losses.append(float(outputs["loss"]))

    timer = Timer()
    L.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=(args.warmup + args.steps) * steps_per_batch,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=tempfile.mkdtemp(),
    ).fit(module, data)
    return timer.end - timer.start, timer.lengths


def sequence_lengths(batch) -> list[int]:
    """Real lengths of a batch's sequences: its rows', or in a packed batch those of the sequences in its rows (each
    ends where the next position restarts at 0), or in a shared-prompt batch each prompt ⊕ response's (the position of
    the response's last token, plus one)."""
    if "reward_index" in batch:
        return (batch["position_ids"].flatten()[batch["reward_index"]] + 1).tolist()
    if "position_ids" not in batch:
        return batch["attention_mask"].sum(-1).tolist()
    positions = batch["position_ids"]
    ends = torch.nn.functional.pad(positions[:, 1:] == 0, (0, 1), value=True) & batch["attention_mask"].bool()
    return (positions[ends] + 1).tolist()


def train_hf(args, trainer) -> float:
    """Run a ``transformers`` / TRL trainer for warmup + steps optimiser steps; seconds of the timed steps."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        start = end = 0.0

        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == args.warmup:
                sync(args.device)
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            sync(args.device)
            self.end = time.perf_counter()

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.end - timer.start


def trl_args(args) -> dict:
    """The TrainingArguments every TRL run shares: same steps, batch, length and precision as ours, no extras."""
    return {
        "output_dir": tempfile.mkdtemp(),
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.max_length,
        "max_steps": args.warmup + args.steps,
        "save_strategy": "no",
        "report_to": [],
        "logging_steps": 10_000,
        "use_cpu": args.device == "cpu",
        "seed": 0,
        "dataloader_num_workers": 0,
        "bf16": False,
        "fp16": False,
    }


def trl_name() -> str:
    return f"trl {__import__('trl').__version__}"


def run_sft_ours(args, model_dir: str, packing: bool = False) -> dict:
    from lightning_rlhf import DemonstrationDataModule, SFTModule

    module = SFTModule(model_dir, dtype=args.dtype, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    data = DemonstrationDataModule(
        train_path=demonstrations_path(args),
        tokenizer_name_or_path=model_dir,
        val_fraction=0,
        batch_size=args.batch_size,
        max_length=args.max_length,
        packing=packing,
    )
    losses: list[float] = []
    seconds, lengths = fit_lightning(args, module, data, losses=losses)
    name = "lightning_rlhf packed" if packing else "lightning_rlhf"
    row = result(args, name, sum(lengths), seconds, model_flops(args, module.model, lengths, "sft"))
    return {**row, "losses": losses} if args.packing else row


def run_sft_trl(args, model_dir: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    records = [json.loads(line) for line in Path(demonstrations_path(args)).read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    config = SFTConfig(**trl_args(args), learning_rate=1e-4, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    batches: list[list[int]] = []
    inner = trainer.data_collator

    def counting_collator(examples):
        batch = inner(examples)
        batches.append(batch["attention_mask"].sum(-1).tolist())
        return batch

    trainer.data_collator = counting_collator
    seconds = train_hf(args, trainer)
    lengths = [n for batch in batches[args.warmup : args.warmup + args.steps] for n in batch]
    return result(args, trl_name(), sum(lengths), seconds, model_flops(args, model, lengths, "sft"))


def preference_pairs(args) -> list[dict[str, str]]:
    """Best vs worst response of each shipped toy comparison, or ``--synthetic`` pairs as long as ``--max-length``."""
    if args.synthetic:
        rng = random.Random(0)
        text = lambda n: "".join(rng.choice(string.ascii_lowercase) for _ in range(n))  # noqa: E731
        prompt, response = args.max_length // 4, args.max_length - args.max_length // 4 - 2  # room for EOS
        return [{"prompt": text(prompt), "chosen": text(response), "rejected": text(response)} for _ in range(256)]
    pairs = []
    for line in Path(toy_path("comparisons")).read_text().splitlines():
        record = json.loads(line)
        ranked = sorted(zip(record["ranks"], record["responses"], strict=True))
        pairs.append({"prompt": record["prompt"], "chosen": ranked[0][1], "rejected": ranked[-1][1]})
    return pairs


def mixed_length_demonstrations() -> list[dict[str, str]]:
    """The toy demonstrations and as many random ones of 10 to 500 tokens (bytes, EOS included), spread evenly, the
    prompt a quarter of each, in a seeded random order."""
    rng = random.Random(0)
    toy = [json.loads(line) for line in Path(toy_path("demonstrations")).read_text().splitlines()]
    text = lambda n: "".join(rng.choice(string.ascii_lowercase) for _ in range(n))  # noqa: E731
    long = []
    for _ in toy:
        length = rng.randint(10, 500)
        long.append({"prompt": text(length // 4), "response": text(length - length // 4 - 1)})
    rows = toy + long
    rng.shuffle(rows)
    return rows


def demonstrations_path(args) -> str:
    """The toy demonstrations, or ``--synthetic`` ones (prompt ⊕ chosen of the synthetic pairs), or with
    ``--mixed-lengths`` ``mixed_length_demonstrations``, in a temp file."""
    if not args.synthetic and not args.mixed_lengths:
        return toy_path("demonstrations")
    path = Path(tempfile.mkdtemp()) / "demonstrations.jsonl"
    if args.mixed_lengths:
        rows = mixed_length_demonstrations()
    else:
        rows = [{"prompt": p["prompt"], "response": p["chosen"]} for p in preference_pairs(args)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prompts_path(args) -> str:
    """The toy prompts, or ``--synthetic`` ones of ``--max-length`` tokens (bytes; ``--prompt-length`` if given) in a
    temp file."""
    length = args.prompt_length or (args.max_length if args.synthetic else 0)
    if not length:
        return toy_path("prompts")
    rng = random.Random(0)
    path = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    prompts = ["".join(rng.choice(string.ascii_lowercase) for _ in range(length)) for _ in range(256)]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def pair_work(args, model, stage: str) -> tuple[int, float]:
    """Real tokens and model FLOPs of prompt ⊕ chosen and prompt ⊕ rejected in the timed steps, from the pairs'
    means: both sides are credited the same work per pair, whatever order their loaders draw the pairs in."""
    from lightning_rlhf.data.records import Record
    from lightning_rlhf.data.tokenization import Tokenizer
    from lightning_rlhf.data.tokenizer import load_tokenizer

    pairs = preference_pairs(args)
    records = [
        Record(str(i), {"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]], "ranks": [0, 1]})
        for i, p in enumerate(pairs)
    ]
    examples = Tokenizer(load_tokenizer(args.model_dir), args.max_length).comparisons(records)
    lengths = [[len(ex["prompt_ids"]) + len(r) for r in ex["response_ids"]] for ex in examples]
    trained = args.batch_size * args.steps / len(examples)  # pairs trained on, per pair of the data
    tokens = sum(map(sum, lengths)) * trained
    flops = sum(model_flops(args, model, pair, stage) for pair in lengths) * trained
    return int(tokens), flops


def pairs_datamodule(args, model_dir: str):
    from lightning_rlhf import ComparisonDataModule

    path = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(args)))
    return ComparisonDataModule(
        train_path=str(path),
        tokenizer_name_or_path=model_dir,
        val_fraction=0,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )


def run_pairs_ours(args, model_dir: str, module, stage: str) -> dict:
    """``module`` (reward model or DPO) trained on the preference pairs."""
    seconds, _ = fit_lightning(args, module, pairs_datamodule(args, model_dir))
    tokens, flops = pair_work(args, module.model, stage)
    return result(args, "lightning_rlhf", tokens, seconds, flops)


def run_dpo_ours(args, model_dir: str) -> dict:
    from lightning_rlhf import DPOModule
    from lightning_rlhf.models.lora import LoraOptions

    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-5)  # noqa: E731
    lora = LoraOptions(r=args.lora_rank, alpha=2 * args.lora_rank) if args.only == "ours_lora" else None
    module = DPOModule(model_dir, dtype=args.dtype, beta=0.1, optimizer=optimizer, lora=lora)
    row = run_pairs_ours(args, model_dir, module, "dpo")
    if lora is not None:
        row["impl"] = f"lightning_rlhf lora r={args.lora_rank} (adapter-off reference)"
    return row


def run_dpo_trl(args, model_dir: str) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    trainer = DPOTrainer(
        model=model,
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        args=DPOConfig(**trl_args(args), learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"]),
        train_dataset=datasets.Dataset.from_list(preference_pairs(args)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    seconds = train_hf(args, trainer)
    tokens, flops = pair_work(args, model, "dpo")
    return result(args, trl_name(), tokens, seconds, flops)


def run_rm_ours(args, model_dir: str) -> dict:
    from lightning_rlhf import RewardModule

    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-5)  # noqa: E731
    return run_pairs_ours(args, model_dir, RewardModule(model_dir, dtype=args.dtype, optimizer=optimizer), "rm")


def kway_comparisons(args) -> list[dict]:
    """K = ``--num-generations`` ranked responses per prompt: toy prompts with answers like an SFT model's samples,
    ranked by the gold judge; or ``--prompt-length`` random prompts with random responses of ``--max-new-tokens``
    bytes (EOS included), in random order."""
    from lightning_rlhf.toy.reverse import gold_score, ideal_response, make_prompts

    rng, k = random.Random(0), args.num_generations
    text = lambda n: "".join(rng.choice(string.ascii_lowercase) for _ in range(n))  # noqa: E731
    if args.prompt_length:  # the byte tokenizer adds EOS to each response
        prompts = [text(args.prompt_length) for _ in range(256)]
        return [
            {
                "prompt": p,
                "responses": [text(args.max_new_tokens - 1) for _ in range(k)],
                "ranks": rng.sample(range(k), k),
            }
            for p in prompts
        ]

    def sample(ideal: str) -> str:
        typo = rng.randrange(len(ideal))
        return rng.choice([ideal, ideal[:-1], ideal[:typo] + rng.choice(string.ascii_lowercase) + ideal[typo + 1 :]])

    out = []
    for record in make_prompts(2048, seed=3):
        responses = [sample(ideal_response(record["prompt"])) for _ in range(k)]
        scores = [gold_score(record["prompt"], r) for r in responses]
        distinct = sorted(set(scores), reverse=True)
        if len(distinct) > 1:  # all tied: no preference, a record the reader refuses
            ranks = [distinct.index(s) for s in scores]
            out.append({"prompt": record["prompt"], "responses": responses, "ranks": ranks})
    return out


def run_shared_prompt_ours(args, model_dir: str) -> dict:
    """Our reward model or DPO on K-way comparisons, padded or (``--layout shared``) in the shared-prompt layout."""
    from lightning_rlhf import ComparisonDataModule, DPOModule, RewardModule

    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-5)  # noqa: E731
    modules = {
        "rm": lambda: RewardModule(model_dir, dtype=args.dtype, optimizer=optimizer),
        "dpo": lambda: DPOModule(model_dir, dtype=args.dtype, beta=0.1, optimizer=optimizer),
    }
    path = Path(tempfile.mkdtemp()) / "comparisons.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in kway_comparisons(args)))
    shared = args.layout == "shared"
    data = ComparisonDataModule(
        train_path=str(path),
        tokenizer_name_or_path=model_dir,
        val_fraction=0,
        batch_size=args.batch_size,
        max_length=args.max_length,
        shared_prompt=shared,
        row_length=args.row_length,
    )
    module, losses = modules[args.stage](), []
    torch.manual_seed(0)  # the reward model's fresh head, built in fit: the same in both runs
    seconds, lengths = fit_lightning(args, module, data, losses=losses)
    name = "lightning_rlhf shared" if shared else "lightning_rlhf padded"
    flops = model_flops(args, module.model, lengths, args.stage)
    return {**result(args, name, sum(lengths), seconds, flops), "losses": losses}


def run_rm_trl(args, model_dir: str) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=getattr(torch, args.dtype)
    )
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**trl_args(args), learning_rate=1e-5),
        train_dataset=datasets.Dataset.from_list(preference_pairs(args)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    seconds = train_hf(args, trainer)
    tokens, flops = pair_work(args, model, "rm")
    return result(args, trl_name(), tokens, seconds, flops)


def run_ppo_ours(args, model_dir: str) -> dict:
    """PPO iterations on toy prompts: the policy and reference from the initial model, a reward (and value) model
    made from it; every response runs to ``--max-new-tokens`` (an untrained model rarely stops)."""
    from lightning_rlhf import PPOModule, PromptDataModule
    from lightning_rlhf.data.tokenizer import load_tokenizer
    from lightning_rlhf.models.export import export_pretrained
    from lightning_rlhf.models.reward import load_reward_model

    tokenizer = load_tokenizer(model_dir)
    rm_dir = str(export_pretrained(load_reward_model(model_dir, tokenizer), tokenizer, Path(tempfile.mkdtemp()) / "rm"))

    class Timed(PPOModule):
        """Records, per rollout, the seconds spent sampling and scoring and the real tokens of its sequences."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rollout_stats: list[tuple[float, float, int]] = []
            self.scoring = 0.0

        def make_experience(self, batch):
            sync(args.device)
            start = time.perf_counter()
            experience = super().make_experience(batch)
            total = time.perf_counter() - start
            self.rollout_stats.append(
                (total - self.scoring, self.scoring, int(experience.rollout.attention_mask.sum()))
            )
            return experience

        def score_rollout(self, rollout):
            sync(args.device)
            start = time.perf_counter()
            experience = super().score_rollout(rollout)
            sync(args.device)
            self.scoring = time.perf_counter() - start
            return experience

    # The same sequences per rollout for every estimator: gae samples 1 response for each of --batch-size prompts, a
    # group estimator G = --num-generations for each of --batch-size / G prompts (and builds no value model).
    spec, _, layout = args.advantage_estimator.partition("+")  # "grpo+shared": --shared-prompt's shared run
    estimator, _, engine = spec.partition("@")  # "grpo@vllm": GRPO with rollouts on vLLM ("grpo@vllm+shared" both)
    group = 1 if estimator == "gae" else args.num_generations
    module = Timed(
        model_dir,
        rm_dir,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        ppo_epochs=2,
        num_mini_batches=2,
        advantage_estimator=estimator,
        num_generations=group,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6),
        rollout_engine=engine or "hf",
        shared_prompt=layout == "shared",
    )
    data = PromptDataModule(
        train_path=prompts_path(args),
        tokenizer_name_or_path=model_dir,
        val_fraction=0,
        batch_size=args.batch_size // group,
        max_length=args.max_length,
    )
    seconds, _ = fit_lightning(args, module, data, steps_per_batch=4)
    timed = module.rollout_stats[args.warmup : args.warmup + args.steps]
    sampling, scoring, tokens = (sum(column) for column in zip(*timed, strict=True))
    return {
        "impl": f"lightning_rlhf ({estimator}, G = {group}{f', {engine} engine' if engine else ''})"
        + (" shared" if layout else ""),
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / args.steps,
        "episodes_per_s": args.batch_size * args.steps / seconds,
        "sampling_share": sampling / seconds,
        "scoring_share": scoring / seconds,
        "update_share": 1 - (sampling + scoring) / seconds,
        "peak_mem_mib": peak_memory_mib(args.device),
    }


def run_grpo_trl(args, model_dir: str) -> dict:
    """TRL's ``GRPOTrainer`` at ours' GRPO shape: ``--batch-size`` completions per generation (G =
    ``--num-generations`` for each of batch / G prompts), 2 passes (``num_iterations``) over 2 minibatches
    (``steps_per_generation``), a reward model made from the initial model, β = 0.05 (a reference, as ours), and with
    ``--engine vllm`` on CUDA vLLM colocated (``use_vllm=True, vllm_mode="colocate"``) as ours is."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lightning_rlhf.data.records import read_records
    from lightning_rlhf.data.tokenizer import load_tokenizer
    from lightning_rlhf.models.export import export_pretrained
    from lightning_rlhf.models.reward import load_reward_model

    tokenizer = load_tokenizer(model_dir)
    rm_dir = str(export_pretrained(load_reward_model(model_dir, tokenizer), tokenizer, Path(tempfile.mkdtemp()) / "rm"))
    records, _ = read_records(prompts_path(args), "prompt")
    per_rollout = 4  # optimiser steps: 2 iterations x 2 minibatches
    timed = argparse.Namespace(**{**vars(args), "warmup": args.warmup * per_rollout, "steps": args.steps * per_rollout})
    # On CPU TRL's colocated vLLM fails to load weights (vLLM's CPU layers repack theirs): there TRL uses generate.
    vllm = {}
    if args.engine == "vllm" and args.device == "cuda":
        vllm = {
            "use_vllm": True,
            "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": 0.3,
            "vllm_importance_sampling_correction": False,
        }
    shared = {**trl_args(timed), "per_device_train_batch_size": args.batch_size // 2, "bf16": args.dtype == "bfloat16"}
    shared.pop("max_length")  # GRPO's prompts are not truncated here (ours neither: max_length is the data's)
    config = GRPOConfig(
        **shared,
        steps_per_generation=2,
        num_iterations=2,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        beta=0.05,
        learning_rate=1e-6,
        **vllm,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)),
        reward_funcs=rm_dir,
        args=config,
        train_dataset=datasets.Dataset.from_list([{"prompt": r.fields["prompt"]} for r in records]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    seconds = train_hf(timed, trainer)
    return {
        "impl": f"{trl_name()} GRPOTrainer (G = {args.num_generations}{', vllm colocate' if vllm else ''})",
        "tokens_per_s": float("nan"),
        "step_s": seconds / args.steps,
        "episodes_per_s": args.batch_size * args.steps / seconds,
        "peak_mem_mib": peak_memory_mib(args.device),
    }


def run_generate_ours(args, model_dir: str) -> dict:
    """Sampled tokens/s of the hf engine (``rollout.generate``) with the KV cache (and compile) of
    ``--generate-variant``, or of the vLLM engine (variant ``vllm``; ``startup_s``: building it)."""
    from lightning_rlhf.data.collate import PromptCollator
    from lightning_rlhf.data.records import read_records
    from lightning_rlhf.data.tokenization import Tokenizer
    from lightning_rlhf.data.tokenizer import load_tokenizer
    from lightning_rlhf.models.causal_lm import load_causal_lm
    from lightning_rlhf.rl.engines import build_engine

    vllm, shared = args.generate_variant == "vllm", args.generate_variant == "shared"
    cache, _, compiled = args.generate_variant.partition("+")
    options = {} if vllm else {"cache_implementation": cache, "compile": compiled == "compile"}
    if args.shared_prompt:  # G rows per prompt: each row prefilled (variant dynamic), or each prompt once (shared)
        options = {"cache_implementation": "dynamic", "share_prompts": shared}
    group = args.num_generations if args.shared_prompt else 1
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, tokenizer, args.dtype).to(args.device)
    startup = time.perf_counter()
    engine = build_engine("vllm" if vllm else "hf", model_dir, args.dtype)
    startup = time.perf_counter() - startup
    records, _ = read_records(prompts_path(args), "prompt")
    examples = Tokenizer(tokenizer, args.max_length).prompts(records)
    collate = PromptCollator(tokenizer.pad_token_id)
    torch.manual_seed(0)
    sampled, start = 0, time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(args.device)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            warmup, start = time.perf_counter() - start, time.perf_counter()
        first = step * (args.batch_size // group) % len(examples)
        batch = collate([ex for ex in examples[first : first + args.batch_size // group] for _ in range(group)])
        rollout = engine.generate(
            model,
            tokenizer,
            batch["input_ids"].to(args.device),
            batch["attention_mask"].to(args.device),
            args.max_new_tokens,
            1.0,
            **options,
        )
        if step >= args.warmup:
            sampled += int(rollout.response_mask.sum())
    sync(args.device)
    seconds = time.perf_counter() - start
    name = {
        "dynamic": "dynamic cache",
        "static": "static cache",
        "static+compile": "static cache + compile",
        "vllm": "vllm engine",
        "shared": f"dynamic cache, a prompt prefilled once for {group} rows",
    }
    if args.shared_prompt and not shared:
        name["dynamic"] = f"dynamic cache, each of a prompt's {group} rows prefilled"
    return {
        "impl": f"lightning_rlhf generate, {name[args.generate_variant]}",
        "tokens_per_s": sampled / seconds,
        "step_s": seconds / args.steps,
        "warmup_s": warmup,
        "startup_s": startup,
        "sampled_tokens": sampled,
        "peak_mem_mib": peak_memory_mib(args.device),
    }


GENERATE_VARIANTS = ("dynamic", "static", "static+compile")

RUNNERS = {
    "sft": (run_sft_ours, run_sft_trl),
    "rm": (run_rm_ours, run_rm_trl),
    "dpo": (run_dpo_ours, run_dpo_trl),
    "ppo": (run_ppo_ours, run_grpo_trl),  # TRL 1.x has no PPOTrainer: its GRPOTrainer beside our grpo
    "generate": (run_generate_ours, None),  # our generation with each --variants, against each other
}
# how a child process gets the variant of its implementation (what follows ":" in "ours:…")
VARIANT_FLAGS = {
    "ppo": "--advantage-estimator",
    "generate": "--generate-variant",
    "sft": "--sft-variant",
    "rm": "--layout",
    "dpo": "--layout",
}


def logprob_impls() -> dict:
    from lightning_rlhf.losses.tokens import token_logprobs

    def naive(logits, tokens):
        return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)

    def trl(logits, tokens):
        from trl.trainer.utils import selective_log_softmax

        return selective_log_softmax(logits, tokens)

    return {
        "ours": ("lightning_rlhf token_logprobs", token_logprobs),
        "naive": ("log_softmax+gather", naive),
        "trl": ("trl selective_log_softmax", trl),
    }


def run_logprobs(args, impl: str) -> dict:
    """Median forward + backward time of the summed log-probs of (b, t) tokens under (b, t, v) logits."""
    name, fn = logprob_impls()[impl]
    torch.manual_seed(0)
    logits = torch.randn(
        args.batch_size, args.seq_len, args.vocab, device=args.device, dtype=getattr(torch, args.dtype)
    )
    tokens = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), device=args.device)
    times, baseline = [], current_memory_mib(args.device)
    for i in range(args.warmup + args.steps):
        leaf = logits.clone().requires_grad_(True)
        if i == args.warmup and args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(args.device)
        start = time.perf_counter()
        fn(leaf, tokens).sum().backward()
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    extra = peak_memory_mib(args.device) - baseline  # beyond the inputs: the clone, activations, gradient
    return {"impl": name, "step_s": sorted(times)[len(times) // 2], "extra_mem_mib": extra}


def print_table(rows: list[dict], key: str) -> None:
    base = rows[0]
    for row in rows:
        ratio = base[key] / row[key] if key == "step_s" else row[key] / base[key]
        extras = "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "impl" and isinstance(v, float))
        print(f"{row['impl']:34s} {extras}  ({key} relative to {base['impl']}: {ratio:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*RUNNERS, "logprobs"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="ppo: tokens sampled per response")
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=["gae"],
        choices=["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"],
        help="ppo: advantage estimators compared in one run, each in its own process",
    )
    parser.add_argument(
        "--num-generations",
        type=int,
        default=4,
        help="ppo: G of the group estimators; rm/dpo --shared-prompt: K per prompt",
    )
    parser.add_argument(
        "--shared-prompt",
        action="store_true",
        help="rm, dpo: ours padded and in the shared-prompt layout, on K-way comparisons",
    )
    parser.add_argument(
        "--prompt-length",
        type=int,
        default=0,
        help="--shared-prompt: synthetic prompts of this many tokens (0: the toy prompts)",
    )
    parser.add_argument(
        "--row-length", type=int, default=None, help="--shared-prompt: tokens per shared row (default --max-length)"
    )
    parser.add_argument("--layout", default="", help=argparse.SUPPRESS)  # "shared" for --shared-prompt's shared run
    parser.add_argument("--advantage-estimator", default="gae", help=argparse.SUPPRESS)
    parser.add_argument("--sft-variant", default="", help=argparse.SUPPRESS)  # "packed" for sft --packing's packed run
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(GENERATE_VARIANTS),
        choices=GENERATE_VARIANTS,
        help="generate: KV cache variants compared in one run, each in its own process",
    )
    parser.add_argument("--generate-variant", default="dynamic", help=argparse.SUPPRESS)
    parser.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="generate, ppo: vllm adds rows sampled by the vLLM engine beside the hf ones",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the result rows to PATH as a JSON list")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--vocab-size", type=int, default=0, help="model vocabulary (default: the tokenizer's 259)")
    parser.add_argument("--synthetic", action="store_true", help="random records as long as --max-length")
    parser.add_argument("--packing", action="store_true", help="sft: ours padded and packed, instead of ours and TRL")
    parser.add_argument(
        "--mixed-lengths",
        action="store_true",
        help="sft: the toy demonstrations and as many random ones of 10-500 tokens",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="for MFU; default on CUDA: the card's dense peak for --dtype"
    )
    parser.add_argument(
        "--lora", action="store_true", help="dpo: also our DPO with LoRA and the adapter-off reference, in the same run"
    )
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--only", choices=["ours", "ours_lora", "naive", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    impls = ["ours", "naive", "trl"] if args.stage == "logprobs" else ["ours", "trl"]
    if args.lora and args.stage != "dpo":
        parser.error("--lora is for the dpo benchmark")
    if args.lora:
        impls.insert(1, "ours_lora")
    if args.stage == "ppo":  # our estimators against each other (TRL 1.x has no PPOTrainer)
        impls = [f"ours:{estimator}" for estimator in args.estimators]
        impls += [f"ours:{estimator}@vllm" for estimator in args.estimators] if args.engine == "vllm" else []
        impls += ["trl"] if "grpo" in args.estimators else []
    if args.stage == "sft" and args.packing:
        impls = ["ours", "ours:packed"]
    if args.shared_prompt and args.stage not in ("rm", "dpo", "ppo", "generate"):
        parser.error("--shared-prompt is for the rm, dpo, ppo and generate benchmarks")
    if args.shared_prompt and args.stage == "ppo":  # each estimator (on each engine asked for) padded, then shared
        engines = ["", "@vllm"] if args.engine == "vllm" else [""]
        layouts = ("", "+shared")
        impls = [f"ours:{e}{engine}{layout}" for e in args.estimators for engine in engines for layout in layouts]
    elif args.shared_prompt:
        impls = ["ours:padded", "ours:shared"]
    if args.stage == "generate":  # our KV cache variants against each other
        impls = [f"ours:{variant}" for variant in [*args.variants, *(["vllm"] if args.engine == "vllm" else [])]]
    if args.stage == "generate" and args.shared_prompt:  # G rows per prompt: each row prefilled, or each prompt once
        impls = ["ours:dynamic", "ours:shared"]
    if args.only:  # child process: one implementation, one JSON line
        if args.stage == "logprobs":
            row = run_logprobs(args, args.only)
        elif args.sft_variant == "packed":  # sft --packing's packed run
            row = run_sft_ours(args, args.model_dir, packing=True)
        elif args.shared_prompt and args.stage in ("rm", "dpo"):
            row = run_shared_prompt_ours(args, args.model_dir)
        else:
            row = RUNNERS[args.stage][args.only == "trl"](args, args.model_dir)
        print("RESULT " + json.dumps(row))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = "" if args.stage == "logprobs" else make_initial_model(args, Path(tmp) / "init")
        rows = []
        for impl in impls:
            if impl == "trl" and importlib.util.find_spec("trl") is None:
                print("trl not installed: no TRL comparison (pip install trl)", file=sys.stderr)
                continue
            impl, _, variant = impl.partition(":")  # ppo: an advantage estimator; generate: a KV cache variant
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    *sys.argv[1:],
                    "--only",
                    impl,
                    "--model-dir",
                    model_dir,
                    *([VARIANT_FLAGS[args.stage], variant] if variant else []),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode or not lines:
                raise SystemExit(f"{impl} failed:\n{child.stderr[-4000:]}")
            rows.append(json.loads(lines[-1][len("RESULT ") :]))
    print(json.dumps({"shape": vars(args), "results": rows}, indent=1, default=str))
    print_table(rows, {"logprobs": "step_s", "ppo": "episodes_per_s"}.get(args.stage, "tokens_per_s"))
    if args.shared_prompt and args.stage in ("rm", "dpo"):
        difference = max(abs(a - b) for a, b in zip(rows[0]["losses"], rows[1]["losses"], strict=True))
        print(f"largest difference in the loss of a step, shared vs padded: {difference:.3g}")
    if args.packing and args.stage == "sft":
        difference = max(abs(a - b) for a, b in zip(rows[0]["losses"], rows[1]["losses"], strict=True))
        print(f"largest difference in the loss of a step, packed vs padded: {difference:.3g}")
    if args.json:
        with atomic_file(args.json) as out:
            json.dump(rows, out, indent=1)
    if args.lora:
        print_table(rows, "peak_mem_mib")


if __name__ == "__main__":
    main()
