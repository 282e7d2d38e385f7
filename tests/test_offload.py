"""CPU offload (``strategies.FSDP2Strategy(cpu_offload=True)``) in one process: what the strategy moves to the device
and what it leaves on the host, the error without sharded models, and the process group's CPU backend. Training with
it on 2 processes is in ``tests/test_distributed.py``; the GPU's side (peak memory) in ``scripts/gpu_check.py``."""

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.tensor import DTensor

from lightning_rlhf import SFTModule
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.training.strategies import FSDP2Strategy, fully_shard_model
from tests.helpers import REPO, run_python


@pytest.fixture
def one_rank_mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def placed_by(strategy: FSDP2Strategy, module: SFTModule) -> FSDP2Strategy:
    # The meta device stands in for a GPU: what model_to_device moves lands there, what it leaves stays on the CPU.
    strategy.parallel_devices = [torch.device("meta")]
    strategy.model = module
    strategy.model_to_device()
    return strategy


def test_offloaded_shards_stay_on_the_host_when_the_rest_moves_to_the_device(tiny_model_dir, one_rank_mesh):
    """After ``configure_model`` Lightning moves the module to its device; with offload the FSDP2 shards (every
    parameter of the sharded model) must stay on the host, where FSDP2 requires them and where the optimiser Lightning
    builds next finds them, while RoPE's ``inv_freq``, the module's buffers and metric states move as before, and the
    module reports the device. Lightning's own ``model_to_device`` (``cpu_offload=False``) moves the shards too: the
    mutation this catches (FSDP2 then refuses the first forward after a copy of every shard on the GPU)."""
    module = SFTModule(tiny_model_dir)
    module.configure_model()
    fully_shard_model(module.model, one_rank_mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
    placed_by(FSDP2Strategy(cpu_offload=True), module)
    shards = list(module.model.parameters())
    assert shards and all(isinstance(p, DTensor) and p.device.type == "cpu" for p in shards)
    assert module.model.model.rotary_emb.inv_freq.device.type == "meta"
    assert module.tokens_seen.device.type == "meta" and module.val_loss.mean_value.device.type == "meta"
    assert module.device.type == "meta"

    placed_by(FSDP2Strategy(cpu_offload=False), module)
    assert all(p.device.type == "meta" for p in module.model.parameters())


def test_offload_without_sharded_models_is_refused_with_what_to_do(tiny_model_dir):
    """A ``configure_model`` that shards nothing would leave every parameter to be moved to the GPU: offload would
    silently not happen. Mutation caught: the parameters moved without a word."""
    module = SFTModule(tiny_model_dir)
    module.configure_model()
    with pytest.raises(ValueError, match=r"cpu_offload=True\) found no fully_shard-ed parameter.*fully_shard_models"):
        placed_by(FSDP2Strategy(cpu_offload=True), module)


def test_offload_on_cuda_adds_a_cpu_backend_for_the_host_shards_collectives():
    """Offloaded gradients are reduced for norm clipping, and rank 0's weights broadcast into host shards, as CPU
    tensors, which NCCL cannot carry: on CUDA the process group is ``cpu:gloo,cuda:nccl``, unless the user named a
    backend; without offload, and on a CPU, Lightning's default. Mutation caught: NCCL alone under offload."""

    def backend(device: str, **kwargs) -> str:
        strategy = FSDP2Strategy(**kwargs)
        strategy.parallel_devices = [torch.device(device)]
        return strategy._get_process_group_backend()

    assert backend("cuda:0", cpu_offload=True) == "cpu:gloo,cuda:nccl"
    assert backend("cuda:0", cpu_offload=True, process_group_backend="nccl") == "nccl"
    assert backend("cuda:0") == "nccl"
    assert backend("cpu", cpu_offload=True) == "gloo"


@pytest.mark.gpu
@pytest.mark.slow
def test_offload_keeps_the_model_state_off_the_gpu_and_trains_alike(tmp_path):
    """SFT of a 50M-parameter model on one GPU, bf16 mixed, two steps without and with offload from the same start
    (``tests/offload_gpu_script.py``). With offload every parameter, its gradient and its AdamW state live on the host,
    the GPU's peak over the steps drops by at least half the model state (16 bytes per parameter: float32 weights,
    gradients, two moments), and the losses agree (the second after one AdamW step on the CPU instead of the GPU).
    Mutations caught: Lightning's ``model_to_device`` moving the shards (FSDP2 refuses the first forward), the
    optimiser built over GPU copies, a policy that offloads nothing (no drop)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    shape = {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    }
    checkpoint = export_pretrained(load_causal_lm(None, tokenizer, "float32", shape), tokenizer, tmp_path / "sft")
    out = tmp_path / "offload.json"
    run_python(
        str(REPO / "tests" / "offload_gpu_script.py"), str(out), str(tmp_path), str(checkpoint), "1", cwd=tmp_path
    )
    report = json.loads(out.read_text())
    plain, offload = report["plain"], report["offload"]
    parameters, on_host, with_state_on_host = offload["offloaded"]
    assert parameters == on_host == with_state_on_host and offload["parameter_device"] == "cpu"
    assert plain["offloaded"][1] == 0 and plain["parameter_device"].startswith("cuda")
    assert offload["peak_gpu_mib"] < plain["peak_gpu_mib"] - plain["model_state_mib"] / 2, report
    assert offload["losses"] == pytest.approx(plain["losses"], rel=1e-3)
