"""Sharded loading under FSDP2 (``strategies.Rank0Load``): rank 0 reads the checkpoint, the other ranks build on the
meta device and receive their shards. Every model of every stage must come out as loading it whole does, and the
other ranks must never hold a whole copy. 2 CPU processes (gloo)."""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.models.reward import load_reward_model
from tests.helpers import REPO, TINY_CONFIG, make_tiny_export, run_python


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_meta_build_has_the_loaded_models_names_shapes_and_dtypes_and_reads_no_weight(tmp_path, dtype):
    """What the ranks but the first build (``meta=True``) must match what rank 0 loads key for key, shape for shape and
    dtype for dtype, or rank 0's broadcast lands in the wrong places or is cast on the way: a causal LM from a bf16
    checkpoint (tied), and a reward model with a fresh head and a reward token's added row. The meta build holds no
    storage. Mutations caught: the meta build without ``fit_to_tokenizer`` (one row short), in the default dtype
    instead of ``dtype``, or from the default config instead of the checkpoint's."""
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    model = load_causal_lm(None, tokenizer, "bfloat16", {**TINY_CONFIG, "tie_word_embeddings": True})
    checkpoint = str(export_pretrained(model, tokenizer, tmp_path / "bf16"))
    grown = load_tokenizer(checkpoint)
    grown.add_special_tokens({"additional_special_tokens": ["<|reward|>"]})
    for load, tok in ((load_causal_lm, tokenizer), (load_reward_model, grown)):
        whole, meta = load(checkpoint, tok, dtype), load(checkpoint, tok, dtype, meta=True)
        expected = {name: (tuple(t.shape), t.dtype) for name, t in whole.state_dict().items()}
        assert {name: (tuple(t.shape), t.dtype) for name, t in meta.state_dict().items()} == expected, load.__name__
        assert all(p.is_meta for p in meta.parameters())
        assert next(whole.parameters()).dtype == getattr(torch, dtype)  # no upcast of the bf16 checkpoint unless asked
        assert whole.config.to_dict() == meta.config.to_dict()


@pytest.mark.slow
def test_every_stage_loads_sharded_exactly_as_whole(tmp_path):
    """SFT (with and without LoRA), the reward model (a fresh head drawn from the RNG, a reward token's added
    embedding row), DPO (policy and live reference), PPO (policy, reference, reward model, value model; the value as
    a head on the policy; LoRA with a value model whose head is fresh), from a start with tied embeddings and a
    generation config of its own. On each of 2 ranks, after sharded loading: the gathered weights equal loading whole
    bit for bit, tied weights are one parameter, buffers (RoPE's inv_freq) and (generation) configs are equal, and the
    RNG state is the one loading whole leaves (later sampling and dropout draw as before).

    Mutations caught (each run by hand): no ``to_empty`` before the load (rank 1's buffers stay on the meta device and
    the run fails; loading into meta parameters with ``assign`` also unties ``lm_head``, seen before ``to_empty`` was
    added); no broadcast of the buffers outside the state dict (14 models' ``buffers`` differ: uninitialised memory);
    no ``Rank0Load.finish`` (``rng`` differs in the 3 stages that draw: fresh head, LoRA's A); no generation-config
    broadcast (9 models' ``generation_config`` differ: rank 1 would sample with the defaults).
    """
    sft_dir = make_tiny_export(tmp_path / "sft", tied=True)
    generation = GenerationConfig.from_pretrained(sft_dir)
    generation.repetition_penalty = 1.5
    generation.save_pretrained(sft_dir)
    tokenizer = load_tokenizer(sft_dir)
    rm_dir = export_pretrained(load_reward_model(sft_dir, tokenizer), tokenizer, tmp_path / "rm")
    rng = random.Random(0)
    comparisons = tmp_path / "comparisons.jsonl"
    comparisons.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}: ", "chosen": rng.choice("abc") * i, "rejected": "d"}) + "\n"
            for i in range(1, 9)
        )
    )
    out = tmp_path / "report.json"
    run_python(
        str(REPO / "tests" / "sharded_load_script.py"),
        str(out),
        str(tmp_path),
        sft_dir,
        str(rm_dir),
        str(comparisons),
        cwd=tmp_path,
    )
    report = json.loads(out.read_text())
    expected_models = {
        "sft": {"model"},
        "sft_lora": {"model"},
        "rm": {"model"},
        "dpo": {"model", "ref_model"},
        "ppo": {"model", "ref_model", "reward_model", "value_model"},
        "ppo_value_head": {"model", "ref_model", "reward_model", "value_head"},
        "ppo_lora_fresh_value": {"model", "value_model"},
    }
    assert report.keys() == expected_models.keys()
    for stage, ranks in report.items():
        assert len(ranks) == 2
        for rank, checks in enumerate(ranks):
            assert checks.pop("rng"), (stage, rank)
            assert checks.keys() == expected_models[stage], (stage, rank)
            for name, model_checks in checks.items():
                assert all(model_checks.values()), (stage, rank, name, model_checks)


@pytest.mark.slow
def test_ranks_but_the_first_never_hold_a_whole_checkpoint(tmp_path):
    """SFT from a 101M-parameter float32 checkpoint (386 MiB) on 2 CPU processes under FSDP2: rank 1's peak RSS growth
    from ``setup`` to fit start, beyond its own half of the parameters, stays under 0.3x the checkpoint (measured
    0.08x; when every rank loaded whole, 0.53x, and 1.02x for a 302M checkpoint). Rank 0 holds one whole copy beside
    its shard. Mutation caught: ``Rank0Load.meta`` False on every rank (every rank loads whole, then shards)."""
    tokenizer = load_tokenizer(None)
    big = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 6,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    }
    torch.manual_seed(0)
    checkpoint = export_pretrained(load_causal_lm(None, tokenizer, "float32", big), tokenizer, tmp_path / "big")
    out = tmp_path / "memory.json"
    run_python(str(REPO / "tests" / "sharded_memory_script.py"), str(out), str(tmp_path), str(checkpoint), cwd=tmp_path)
    report = json.loads(out.read_text())
    size = report["checkpoint_mib"]
    assert size > 350
    rank0, rank1 = report["ranks"]
    assert rank1["shard_mib"] == pytest.approx(size / 2, rel=0.01)  # the measure sees the shards
    assert rank1["peak_growth_mib"] - rank1["shard_mib"] < 0.3 * size, report
    assert rank0["peak_growth_mib"] - rank0["shard_mib"] < 1.3 * size, report
    assert Path(checkpoint, "model.safetensors").exists()
