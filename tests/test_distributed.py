"""The stages on several processes: under DDP replicas agree and validation reduced over the ranks equals validation in
one process; under FSDP2 (ModelParallelStrategy) every stage, and under FSDP1 SFT and the reward model, match DDP.
Each runs on 2 CPU processes (gloo), and on CUDA (NCCL) with 1 and 2 devices where there are GPUs (``ACCELERATORS``)."""

import json
import random
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_rlhf import ComparisonDataModule, DPOModule, RewardModule
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.models.reward import load_reward_model
from tests.helpers import ACCELERATORS, REPO, make_tiny_export, run_cli, run_python


def write_comparisons(path: Path, n: int, seed: int) -> str:
    """Comparisons with K = 2 or 3 (so ranks are padded across a batch) and a tie now and then."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = 2 + i % 2
        responses = ["".join(rng.choice("abcdef") for _ in range(rng.randint(1, 6))) + str(j) for j in range(k)]
        ranks = [0, 1] if k == 2 else rng.choice([[0, 1, 2], [1, 0, 1], [2, 0, 1]])
        rows.append({"prompt": f"Q{i}: {rng.random():.3f}\n", "responses": responses, "ranks": ranks})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def validate_alone(module, sft_dir, train, val, root) -> dict[str, float]:
    data = ComparisonDataModule(train_path=train, val_path=val, tokenizer_name_or_path=sft_dir, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=root)
    return {name: float(value) for name, value in trainer.validate(module, data, verbose=False)[0].items()}


@pytest.mark.slow
@pytest.mark.parametrize(("accelerator", "devices"), ACCELERATORS)
def test_reward_model_and_dpo_under_ddp_match_a_single_process(tmp_path, accelerator, devices):
    sft_dir = make_tiny_export(tmp_path / "sft")
    train = write_comparisons(tmp_path / "train.jsonl", 16, seed=0)
    val = write_comparisons(tmp_path / "val.jsonl", 8, seed=1)  # 8 prompts: 4 per rank, no sampler padding
    out = tmp_path / "ddp.json"
    run_python(
        str(REPO / "tests" / "ddp_preference_script.py"),
        str(out),
        str(tmp_path),
        sft_dir,
        train,
        val,
        accelerator,
        str(devices),
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    assert report["world_size"] == devices
    assert len(set(report["rm_checksums"])) == 1
    assert len(set(report["dpo_checksums"])) == 1
    # Each rank holds the reference log-prob of every train and val response (16·2.5 + 8·2.5 = 60 rows).
    assert report["dpo_cache_sizes"] == [60] * devices

    rm = RewardModule(str(tmp_path / "rm"))
    rm.configure_model()
    alone = validate_alone(rm, sft_dir, train, val, tmp_path)
    for name in ("val/loss", "val/accuracy", "val/margin", "val/reward_mean", "val/reward_std"):
        assert report["rm_val"][name] == pytest.approx(alone[name], abs=1e-5), name

    # The trained policy validated alone against a live reference (the SFT export) in one process.
    dpo = DPOModule(sft_dir)
    dpo.configure_model()
    dpo.model.load_state_dict(AutoModelForCausalLM.from_pretrained(tmp_path / "dpo").state_dict())
    alone = validate_alone(dpo, sft_dir, train, val, tmp_path)
    for name in ("val/loss", "val/rewards/margins", "val/rewards/accuracies", "val/logps/chosen"):
        assert report["dpo_val"][name] == pytest.approx(alone[name], abs=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize(("accelerator", "devices"), ACCELERATORS)
def test_ppo_under_ddp_and_fsdp2_keeps_replicas_and_beta_in_step_on_different_prompts(tmp_path, accelerator, devices):
    """Several manual backward passes per training_step must all be all-reduced: after 3 rollouts (6 optimiser
    steps) both ranks hold the same policy and value model, and the same adaptive β, although each rank sampled
    its own prompts. The frozen reference never moves."""
    sft_dir = make_tiny_export(tmp_path / "sft")
    tokenizer = load_tokenizer(sft_dir)
    export_pretrained(load_reward_model(sft_dir, tokenizer), tokenizer, tmp_path / "rm")
    out = tmp_path / "ddp.json"
    run_python(
        str(REPO / "tests" / "ddp_ppo_script.py"),
        str(out),
        str(tmp_path),
        sft_dir,
        str(tmp_path / "rm"),
        accelerator,
        str(devices),
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    assert report["world_size"] == devices
    for name in ("policy_checksums", "value_checksums", "kl_coefs"):
        assert len(set(report[name])) == 1, (name, report)
    assert len(set(report["first_prompts"])) == devices
    assert report["kl_coefs"][0] != 0.05  # β did adapt
    start = AutoModelForCausalLM.from_pretrained(sft_dir)
    assert report["reference_checksums"][0] == pytest.approx(sum(p.double().sum().item() for p in start.parameters()))
    assert report["policy_checksums"][0] != report["reference_checksums"][0]

    # FSDP2 (ModelParallelStrategy) from the same start on the same prompts: each forward gathers the full weights,
    # so rollouts, β and the gathered export match DDP's up to the order of gradient reductions.
    assert report["fsdp2_kl_coefs"] == pytest.approx(report["kl_coefs"], rel=1e-6)
    # That run offloads (FSDP2Strategy(cpu_offload=True)): every parameter of all four models, with its gradient and
    # AdamW state, on the host as FSDP2 records it (a model left out of the policy fails here).
    assert sorted(report["offloaded"]) == ["model", "ref_model", "reward_model", "value_model"]
    for name, (parameters, on_host, with_state_on_host) in report["offloaded"].items():
        assert parameters > 0 and parameters == on_host == with_state_on_host, name
    # Generation keeps the policy gathered across decode steps, and it is sharded again afterwards.
    assert report["sharded_inside_outside_gathered"] == [False, True]
    # The same with the value function as a head on the policy (its gradient reaches the policy too).
    for ddp_dir, fsdp2_dir in (("ddp", "fsdp2"), ("ddp_head", "fsdp2_head")):
        ddp, fsdp2 = (AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in (ddp_dir, fsdp2_dir))
        assert ddp.keys() == fsdp2.keys()
        for name, weight in ddp.items():
            torch.testing.assert_close(fsdp2[name], weight, atol=1e-5, rtol=1e-4, msg=f"{fsdp2_dir}: {name}")
        assert not torch.equal(ddp["lm_head.weight"], start.state_dict()["lm_head.weight"])


@pytest.mark.slow
@pytest.mark.parametrize(("accelerator", "devices"), ACCELERATORS)
def test_ppo_fsdp2_config_trains_in_mixed_bf16_exports_and_resumes(tmp_path, accelerator, devices):
    """configs/ppo_fsdp2.yaml through the CLI, only the devices overridden (e.g. 2 CPU processes for GPUs): FSDP2 in
    bf16 mixed precision trains, exports its float32 master weights in Hugging Face format, writes a sharded
    checkpoint, and resumes from it. Policy and reference have tied embeddings."""
    sft_dir = make_tiny_export(tmp_path / "sft", tied=True)
    tokenizer = load_tokenizer(sft_dir)
    rm_dir = export_pretrained(load_reward_model(sft_dir, tokenizer), tokenizer, tmp_path / "rm")

    def run(max_steps: int, *extra: str) -> subprocess.CompletedProcess:
        return run_cli(
            "fit",
            "--config",
            str(REPO / "configs" / "ppo_fsdp2.yaml"),
            f"--trainer.accelerator={accelerator}",
            f"--trainer.devices={devices}",
            f"--trainer.strategy.init_args.data_parallel_size={devices}",
            f"--model.init_args.model_name_or_path={sft_dir}",
            f"--model.init_args.reward_model_name_or_path={rm_dir}",
            "--model.init_args.max_new_tokens=6",
            "--data.init_args.batch_size=4",
            f"--trainer.max_steps={max_steps}",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.export_dir={tmp_path / 'hf'}",
            *extra,
            cwd=tmp_path,
        )

    first = run(8)
    log = first.stdout + first.stderr
    # The memory estimate, per rank, before step 1 (issue 23's bar).
    assert "memory per rank, estimated before step 1" in log and "generation KV cache" in log
    assert ("policy gathered for generation" in log) == (devices > 1)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.config.dtype == torch.float32
    start = AutoModelForCausalLM.from_pretrained(sft_dir)
    assert not torch.equal(exported.lm_head.weight.float(), start.lm_head.weight)
    (checkpoint,) = (tmp_path / "tensorboard").glob("version_0/checkpoints/last.ckpt")
    assert len(list(checkpoint.glob("*.distcp"))) == devices  # one shard per rank
    resumed = run(16, f"--ckpt_path={checkpoint}")
    assert "Restored all states" in resumed.stdout + resumed.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("accelerator", "devices"), ACCELERATORS)
def test_sft_reward_model_and_dpo_under_fsdp2_and_fsdp1_match_ddp(tmp_path, accelerator, devices):
    """The same 3 clipped steps from the same start with DDP, with FSDP2 (every model fully_shard-ed over the
    data-parallel mesh, DPO's live reference included) and with FSDP1 (norm clipping through the root FSDP module):
    the gathered exports agree to float32 reduction order, and so does the reward model's normalisation offset
    (forwards every rank makes on the same data; under FSDP1 they crashed with "'weight' must be 2-D" outside the
    root module's forward, and no export was written). FSDP1's DPO export failed too, on the reference's weights left
    out of the state dict. The start has tied embeddings, which FSDP2 refused while the backbone was its own unit.
    FSDP2's SFT also checkpoints each block's activations (recomputed in backward, gathered again by FSDP2).
    FSDP2 with CPU offload (``FSDP2Strategy(cpu_offload=True)``) matches too, and FSDP2 recorded every parameter of
    every model (DPO's reference included) as offloaded, on the CPU with its gradient and AdamW state. On a CPU the
    shards are on the host anyway: this catches a model left out of the policy, not a shard moved to a GPU
    (``test_offloaded_shards_stay_on_the_host_when_the_rest_moves_to_the_device`` and ``scripts/gpu_check.py`` do)."""
    sft_dir = make_tiny_export(tmp_path / "sft", tied=True)
    comparisons = write_comparisons(tmp_path / "train.jsonl", 16, seed=0)
    demonstrations = tmp_path / "demonstrations.jsonl"
    demonstrations.write_text(
        "".join(json.dumps({"prompt": f"Q{i}: ", "response": "abcdef"[i % 6 :]}) + "\n" for i in range(16))
    )
    run_python(
        str(REPO / "tests" / "sharded_script.py"),
        str(tmp_path),
        sft_dir,
        comparisons,
        str(demonstrations),
        accelerator,
        str(devices),
        cwd=tmp_path,
    )
    start = load_file(Path(sft_dir) / "model.safetensors")
    for stage in ("sft", "rm", "dpo"):
        ddp = load_file(tmp_path / f"{stage}_ddp" / "model.safetensors")
        moved = "model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(ddp[moved], start[moved]), stage
        for sharded in ("fsdp2", "fsdp2_offload", "fsdp1"):
            weights = load_file(tmp_path / f"{stage}_{sharded}" / "model.safetensors")
            assert ddp.keys() == weights.keys()
            for name, weight in ddp.items():
                torch.testing.assert_close(
                    weights[name], weight, atol=1e-5, rtol=1e-4, msg=f"{stage} {sharded}: {name}"
                )
    names = ("ddp", "fsdp2", "fsdp2_offload", "fsdp1")
    offsets = [AutoConfig.from_pretrained(tmp_path / f"rm_{name}").reward_offset for name in names]
    assert offsets[0] != 0 and offsets[1:] == pytest.approx([offsets[0]] * 3, abs=1e-5)
    offloaded = json.loads((tmp_path / "offload.json").read_text())
    assert {stage: sorted(models) for stage, models in offloaded.items()} == {
        "sft": ["model"],
        "rm": ["model"],
        "dpo": ["model", "ref_model"],
    }
    for stage, models in offloaded.items():
        for name, (parameters, on_host, with_state_on_host) in models.items():
            assert parameters > 0 and parameters == on_host == with_state_on_host, (stage, name)


@pytest.mark.slow
@pytest.mark.parametrize(("accelerator", "devices"), ACCELERATORS)
def test_sft_with_tied_embeddings_trains_and_exports_under_fsdp2_through_the_cli(tmp_path, accelerator, devices):
    """The command of issue 12: FSDP2 gave the backbone a unit of its own while the tied ``lm_head`` stayed in the
    root, and failed with 'Parameter model.embed_tokens.weight is shared with a parameter already managed by another
    FSDP group'. Now it trains and exports a tied model that plain transformers loads."""
    run_cli(
        "fit",
        "--config",
        str(REPO / "configs" / "sft.yaml"),
        f"--trainer.accelerator={accelerator}",
        f"--trainer.devices={devices}",
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        f"--trainer.strategy.init_args.data_parallel_size={devices}",
        "--trainer.strategy.init_args.tensor_parallel_size=1",
        '--model.init_args.model_config={"tie_word_embeddings": true}',
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.export_dir={tmp_path / 'hf'}",
        cwd=tmp_path,
    )
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    ids = torch.tensor([[1, 40, 41, 42]])
    assert torch.isfinite(exported(input_ids=ids).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize(("accelerator", "devices"), ACCELERATORS)
def test_fsdp2_bf16_mixed_keeps_float32_master_weights_and_computes_in_bf16(tmp_path, accelerator, devices):
    """Under ModelParallelStrategy, precision="bf16-mixed" is FSDP2's MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32): the stored shards, their gradients and AdamW's state are float32 (pure-bf16 weights barely
    move at RLHF learning rates), while each block is gathered and computed in bf16."""
    out = tmp_path / "dtypes.json"
    run_python(
        str(REPO / "tests" / "mixed_precision_script.py"),
        str(out),
        str(tmp_path),
        accelerator,
        str(devices),
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    assert report == {
        "compute_weight": "torch.bfloat16",
        "compute_input": "torch.bfloat16",
        "stored_weight": "torch.float32",
        "stored_grad": "torch.float32",
        "optimizer_state": "torch.float32",
    }


@pytest.mark.slow
@pytest.mark.parametrize(("accelerator", "devices"), ACCELERATORS)
def test_every_stage_with_lora_under_ddp_and_fsdp2_matches_a_single_process(tmp_path, accelerator, devices):
    """LoRA under DDP: after 3 steps every rank holds the same adapters and the SFT export's base bit for bit, rank 0
    alone exported, and for SFT, the reward model and DPO the merged model and the adapter equal those of one process
    trained on the same global batches. 8 records, 4 per rank: each step's global batch is all of them, and every
    per-rank loss is a mean over equally many terms (4 pairs; 4 responses of 4 tokens + EOS), so the mean of the two
    ranks' gradients is the gradient of one process's batch of 8. FSDP2 (the transformers model inside the PeftModel
    fully_shard-ed, its export gathered before the merge; DPO's and PPO's reference the adapter switched off, PPO
    generating through the transformers model) exports the same as DDP, PPO included (its ranks sample their own
    prompts: no single-process twin). Under FSDP2 PPO failed in generate ("mixed torch.Tensor and DTensor") while the
    PeftModel was the root unit, and every export failed before the gather."""
    from tests.ddp_lora_script import fit, lora_stage

    sft_dir = make_tiny_export(tmp_path / "sft")
    tokenizer = load_tokenizer(sft_dir)
    rm_dir = export_pretrained(load_reward_model(sft_dir, tokenizer), tokenizer, tmp_path / "rm")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdef") for _ in range(4)) for _ in range(16)]
    comparisons = tmp_path / "comparisons.jsonl"
    comparisons.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}: ", "chosen": words[i], "rejected": words[i + 8]}) + "\n" for i in range(8)
        )
    )
    demonstrations = tmp_path / "demonstrations.jsonl"
    demonstrations.write_text(
        "".join(json.dumps({"prompt": f"Q{i}{'?' * i}: ", "response": words[i]}) + "\n" for i in range(8))
    )
    out = tmp_path / "ddp.json"
    run_python(
        str(REPO / "tests" / "ddp_lora_script.py"),
        str(out),
        str(tmp_path),
        sft_dir,
        str(rm_dir),
        str(comparisons),
        str(demonstrations),
        accelerator,
        str(devices),
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    assert report["world_size"] == devices
    for stage in ("sft", "rm", "dpo", "ppo"):
        assert report[stage]["adapters_equal_rank0"] == [True] * devices, stage
        assert report[stage]["base_unchanged"] == [True] * devices, stage
        assert report[stage]["exports"] == [1] + [0] * (devices - 1), stage
        assert report[stage]["fsdp2_sharded"] == [devices > 1] * 2, stage  # an adapter and a base weight
        runs = ["fsdp2"]
        if stage != "ppo":
            L.seed_everything(0)
            module, data = lora_stage(
                stage,
                sft_dir,
                str(comparisons),
                str(demonstrations),
                str(tmp_path / f"{stage}_one"),
                batch_size=4 * devices,
            )
            fit(module, data, str(tmp_path), "cpu", 1, "auto")
            runs.append("one")
        for files in ("model.safetensors", "adapter/adapter_model.safetensors"):
            ddp = load_file(tmp_path / f"{stage}_ddp" / files)
            for run in runs:
                other = load_file(tmp_path / f"{stage}_{run}" / files)
                assert ddp.keys() == other.keys() and ddp, (stage, run, files)
                # One process sums gradients in another order. Adam's first steps move a factor A by about lr where
                # its gradient (through B near 0) is tiny, so that noise shows in A (2e-5, the reward model's
                # up_proj) while the merged weights, B·A, agree to 1.3e-6.
                atol = 1e-4 if run == "one" and files.startswith("adapter") else 1e-5
                for name, weight in ddp.items():
                    torch.testing.assert_close(
                        other[name], weight, atol=atol, rtol=0, msg=f"{stage} {run} {files}: {name}"
                    )
        adapter = load_file(tmp_path / f"{stage}_ddp" / "adapter" / "adapter_model.safetensors")
        assert all(w.abs().max() > 1e-4 for n, w in adapter.items() if "lora_B" in n), stage  # trained from B = 0
    # PPO's generation keeps the LoRA policy gathered across decode steps, and it is sharded again afterwards.
    assert report["ppo"]["sharded_inside_outside_gathered"] == [False, True]
    offsets = [AutoConfig.from_pretrained(tmp_path / f"rm_{run}").reward_offset for run in ("ddp", "fsdp2", "one")]
    assert offsets[0] != 0 and offsets[1:] == pytest.approx([offsets[0]] * 2, abs=1e-5)
