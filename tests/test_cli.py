"""The `lightning-rlhf` CLI: every shipped config parses, SFT runs end to end, and DDP on 2 CPU processes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lightning_rlhf import SFTModule
from lightning_rlhf.cli import main
from tests.helpers import REPO, run_cli, run_python

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_rlhf." in printed and "trainer:" in printed


def test_sft_config_is_shipped():
    assert REPO / "configs" / "sft.yaml" in CONFIGS


@pytest.mark.slow
def test_sft_cli_writes_tensorboard_events_and_an_export_with_identical_logits(tmp_path):
    run_cli(
        "fit",
        "--config",
        str(REPO / "configs" / "sft.yaml"),
        "--trainer.max_steps=12",
        "--trainer.val_check_interval=6",
        "--trainer.log_every_n_steps=2",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.export_dir={tmp_path / 'hf'}",
        cwd=tmp_path,
    )
    (events,) = (tmp_path / "tensorboard").glob("version_*/events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    for tag in ("train/loss", "train/ppl", "train/tokens_seen", "val/loss", "val/ppl", "lr-AdamW"):
        assert tag in tags, tags

    (checkpoint,) = (tmp_path / "tensorboard").glob("version_*/checkpoints/last.ckpt")
    module = SFTModule()
    module.configure_model()
    module.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    input_ids = torch.tensor([list(b"Reverse: abc\n")]) + 3  # byte b has id b + 3 (after <pad>, <s>, </s>)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids).logits, module.model.eval()(input_ids).logits, rtol=0, atol=0)
    untrained = SFTModule()
    untrained.configure_model()
    with torch.no_grad():
        assert not torch.allclose(exported(input_ids).logits, untrained.model.eval()(input_ids).logits)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_replicas_identical(tmp_path):
    """Each rank gets different batches, gradients are averaged (identical parameters after 4 steps), the
    tokens_seen counter adds both ranks' tokens, and only rank 0 tokenizes the data (``prepare_data``)."""
    out = tmp_path / "ddp.json"
    run_python(str(REPO / "tests" / "ddp_sft_script.py"), str(out), str(tmp_path), cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    first, second = report["checksums"]
    assert first == second
    assert report["tokens_seen"] == sum(report["local_tokens"])
    assert min(report["local_tokens"]) > 0
    rank0_batch, rank1_batch = report["first_batches"]
    assert rank0_batch != rank1_batch
    assert report["builds"] == [1, 0]  # rank 0 tokenized the toy demonstrations once; rank 1 read its cache


def test_fsdp_config_builds_its_wrap_policy_from_class_paths():
    """The YAML names decoder-layer classes by import path; they must become a real FSDP wrap policy."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    config = yaml.safe_load((REPO / "configs" / "sft_fsdp.yaml").read_text())["trainer"]["strategy"]
    strategy = parser.instantiate(parser.parse_object({"strategy": config})).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}


def test_help_points_to_the_extra_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "lightning-rlhf sample --help" in capsys.readouterr().out
    for subcommand in ("sample", "score", "pipeline"):
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, "--help"])
        assert exit_info.value.code == 0 and "--model" in capsys.readouterr().out


def test_the_cli_loads_the_pipeline_only_for_the_pipeline_subcommand():
    """``lightning-rlhf fit`` (and every other subcommand) starts without importing the pipeline
    (``lightning_rlhf.commands.pipeline.loop``) and the TensorBoard event reader it needs, in a fresh interpreter.
    Catches a top-level import of the pipeline in cli.py, which would slow every command's start."""
    code = (
        "import sys, lightning_rlhf.cli; print(sorted(m for m in sys.modules "
        "if m == 'lightning_rlhf.commands.pipeline.loop' or m.startswith('tensorboard.backend.event_processing')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("export_dir", ["scratch", "."])
def test_an_export_dir_holding_the_users_files_or_the_run_is_refused_before_training(
    tmp_path, monkeypatch, capsys, export_dir
):
    """The issue's reproduction: export_dir = the run's root (holding the user's files), and export_dir = the working
    directory. Both stop before the first step, and every file is still there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scratch" / "precious").mkdir(parents=True)
    (tmp_path / "scratch" / "precious" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="1"):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "sft.yaml"),
                "--trainer.max_steps=2",
                "--trainer.default_root_dir=scratch",
                "--trainer.logger.init_args.save_dir=scratch",
                f"--model.init_args.export_dir={export_dir}",
                "--trainer.enable_progress_bar=false",
            ]
        )
    assert (tmp_path / "scratch" / "precious" / "notes.txt").read_text() == "x"
    assert not list(tmp_path.rglob("*.ckpt"))
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"export_dir={export_dir!r} would replace" in error


def logged(root, tag: str) -> dict[int, float]:
    (events,) = Path(root).glob("tensorboard/version_*/events.out.tfevents.*")
    return {event.step: event.value for event in EventAccumulator(str(events)).Reload().Scalars(tag)}


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_with_the_losses_of_the_uninterrupted_run(tmp_path):
    """``configs/sft.yaml`` (60 batches an epoch), 10 steps, a checkpoint every 4: one run straight; one killed with
    SIGKILL while it holds after the step-4 checkpoint, then resumed from it with ``--ckpt_path``. Steps 5..10 of
    the resumed run log the straight run's losses (with the old DataLoader they were the losses of batches 0..5)."""

    def args(name: str, *extra: str) -> list[str]:
        callbacks = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(tmp_path / name / "ckpt"),
                    "every_n_train_steps": 4,
                    "save_top_k": -1,
                    "filename": "{step}",
                },
            }
        ]
        if name == "killed":
            callbacks.append({"class_path": "tests.helpers.HoldAfter", "init_args": {"step": 4, "root": str(tmp_path)}})
        (tmp_path / f"{name}.yaml").write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
        return [
            "-m",
            "lightning_rlhf",
            "fit",
            "--config",
            str(REPO / "configs" / "sft.yaml"),
            "--config",
            str(tmp_path / f"{name}.yaml"),
            "--trainer.max_steps=10",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / name}",
            f"--trainer.logger.init_args.save_dir={tmp_path / name}",
            "--model.init_args.export_dir=null",
            *extra,
        ]

    run_python(*args("straight"), cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, *args("killed")], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            if (tmp_path / "holding").exists() or killed.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "holding").exists(), "the run never reached its hold after step 4"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    checkpoint = tmp_path / "killed" / "ckpt" / "step=4.ckpt"
    run_python(*args("resumed", f"--ckpt_path={checkpoint}"), cwd=tmp_path)
    straight, resumed = logged(tmp_path / "straight", "train/loss"), logged(tmp_path / "resumed", "train/loss")
    assert sorted(resumed) == sorted(straight)[4:] and len(straight) == 10
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], abs=1e-5), step


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_a_stage_run_before_the_stage_it_reads_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    """configs/dpo.yaml before SFT: not transformers' "Repo id must be in the form ..." but the missing path, the
    stage that writes it, exit status 1; with --debug the exception itself."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="1"):
        main(["fit", "--config", str(REPO / "configs" / "dpo.yaml")])
    assert error_lines(capsys) == [
        "error: the path outputs/sft/hf does not exist: run the stage that exports it first "
        "(lightning-rlhf fit --config configs/sft.yaml)"
    ]
    with pytest.raises(ValueError, match="does not exist"):  # jsonargparse's wrapper, the cause chained inside
        main(["fit", "--config", str(REPO / "configs" / "dpo.yaml"), "--debug"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.init_args.train_path=bad.jsonl"], r"error: .*bad\.jsonl line 2: field 'response' is missing"),
        (["--data.init_args.batch_size=0"], r"error: batch_size=0: must be >= 1"),
        (["--model.init_args.dtype=float64"], r"error: dtype='float64' is not one of"),
    ],
    ids=["record error", "invalid setting", "invalid dtype"],
)
def test_user_errors_in_fit_are_one_line_and_exit_status_1(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(SystemExit, match="1"):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "sft.yaml"),
                "--trainer.max_steps=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.logger=false",
                "--model.init_args.export_dir=null",
                "--trainer.default_root_dir=run",
                *args,
            ]
        )
    (line,) = error_lines(capsys)
    assert re.match(expected, line), line


def test_a_trainer_misconfiguration_is_one_line_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="1"):
        main(["fit", "--config", str(REPO / "configs" / "sft.yaml"), "--trainer.enable_checkpointing=false"])
    (line,) = error_lines(capsys)
    assert "enable_checkpointing=False` but found `ModelCheckpoint`" in line


@pytest.mark.parametrize("where", ["config", "command line"])
def test_a_path_from_before_the_layered_layout_names_where_it_lives_now(tmp_path, monkeypatch, capsys, where):
    """A user's YAML written for the flat package (``lightning_rlhf.callbacks.BestWeights``,
    ``lightning_rlhf.datamodules...``): one line naming the file (or the command line), the old path and the new one,
    before anything is built — not jsonargparse's page-long "does not validate". Catches: the check skipped for
    ``--config`` files, a missing submodule taken for a missing optional extra (any import error counted as "it
    exists"), the new home not found."""
    monkeypatch.chdir(tmp_path)
    old = "lightning_rlhf.callbacks.BestWeights"
    config = tmp_path / "old.yaml"
    config.write_text(f"trainer:\n  callbacks:\n    - class_path: {old}\n")
    argv = ["--config", str(config)] if where == "config" else [f"--trainer.callbacks+={old}"]
    with pytest.raises(SystemExit, match="1"):
        main(["fit", *argv])
    source = str(config) if where == "config" else "the command line"
    assert error_lines(capsys) == [
        f"error: {source}: {old} does not exist (lightning_rlhf is laid out in layers); it is "
        "lightning_rlhf.training.callbacks.BestWeights now: update the path"
    ]
