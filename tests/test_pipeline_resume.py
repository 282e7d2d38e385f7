"""The same pipeline command run again continues it (``commands.pipeline.resume``): finished stages are skipped, a
changed setting or input runs that stage and the ones downstream again, a stopped stage resumes from its last
checkpoint, ``--restart`` starts over. A fake launcher stands in for the stages' commands: it writes what each stage
writes and records what ran, so each test takes well under a second."""

import pytest

from lightning_rlhf.commands.pipeline.argv import Run, export, fit_argv, sample_argv
from lightning_rlhf.commands.pipeline.loop import StageRunner
from lightning_rlhf.commands.pipeline.options import build_parser
from lightning_rlhf.commands.pipeline.resume import Manifests, option, output_of


class FakeStages:
    """A launcher that writes each command's output (a ``fit``'s export, a ``sample``'s file) and exits 0, or, for the
    stages in ``stop``, writes what a run killed part-way leaves (a ``fit``'s ``last.ckpt`` when ``checkpoint``, a
    ``sample``'s partial output) and exits 137; ``ran`` holds every command it was given."""

    def __init__(self):
        self.ran: list[list[str]] = []
        self.stop: set[str] = set()
        self.checkpoint = True

    def __call__(self, argv: list[str], threads: int | None, log) -> int:
        self.ran.append(argv)
        output = output_of(argv)
        stage = output.parent.name if argv[0] == "fit" else output.stem
        if stage in self.stop and argv[0] == "fit":
            if self.checkpoint:
                checkpoints = output.parent / "tensorboard" / "version_0" / "checkpoints"
                checkpoints.mkdir(parents=True, exist_ok=True)
                (checkpoints / "last.ckpt").write_text("step 10")
            return 137
        if stage in self.stop:
            output.with_name(output.name + ".partial").write_text("half\n")
            return 137
        if argv[0] == "fit":
            output.mkdir(parents=True, exist_ok=True)
            (output / "model.safetensors").write_text(" ".join(argv))
        else:
            output.write_text("samples\n")
        return 0

    def stages(self) -> list[str]:
        """The stages that ran, in order."""
        return [output_of(argv).parent.name if argv[0] == "fit" else output_of(argv).stem for argv in self.ran]


@pytest.fixture
def toy(tmp_path):
    """A run of two stages, ``sft`` and ``rm`` reading its export, with configs of their own under ``tmp_path``."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("sft.yaml", "rm.yaml"):
        (configs / name).write_text("trainer: {}\n")
    return Run(configs, tmp_path / "outputs", seed=0)


def pipeline(run: Run, launch: FakeStages, restart: bool = False, sft_lr: str = "3e-3") -> None:
    """``sft`` at learning rate ``sft_lr``, then ``rm`` from its export, as ``loop.run`` chains them."""
    manifests = Manifests(run.outputs / "pipeline" / "stages", restart)
    runner = StageRunner(1, run.outputs / "pipeline" / "logs", launch, manifests)
    sft = fit_argv(run, "sft", "sft.yaml", f"--model.init_args.optimizer.init_args.lr={sft_lr}")
    runner.together({"sft": sft})
    runner.together(
        {"rm": fit_argv(run, "rm", "rm.yaml", f"--model.init_args.model_name_or_path={export(run, 'sft')}")}
    )


def test_a_finished_stage_is_skipped_and_a_changed_setting_or_input_runs_it_and_those_downstream_again(toy, capsys):
    """Run again unchanged, neither stage runs, each saying so; SFT's learning rate changed, SFT runs again and so does
    the reward model, whose input (SFT's export) changed; the reward model's config edited, it alone runs again.
    Catches a finished stage run again, a changed setting or input not noticed, and a stage downstream of one that
    ran again skipped."""
    launch = FakeStages()
    pipeline(toy, launch)
    assert launch.stages() == ["sft", "rm"]

    launch.ran.clear()
    pipeline(toy, launch)
    out = capsys.readouterr().out
    assert launch.stages() == []
    assert "stage sft: done, skipped" in out and "stage rm: done, skipped" in out

    pipeline(toy, launch, sft_lr="1e-3")
    out = capsys.readouterr().out
    assert launch.stages() == ["sft", "rm"]
    assert (
        "stage sft: runs again from the start, its command changed (--model.init_args.optimizer.init_args.lr=1e-3 in "
        "place of --model.init_args.optimizer.init_args.lr=3e-3)" in out
    )
    assert f"stage rm: runs again from the start, its input {export(toy, 'sft')} changed" in out

    launch.ran.clear()
    (toy.configs / "rm.yaml").write_text("trainer: {max_steps: 5}\n")
    pipeline(toy, launch, sft_lr="1e-3")
    assert launch.stages() == ["rm"]
    assert f"its input {toy.configs / 'rm.yaml'} changed" in capsys.readouterr().out


def test_restart_runs_every_stage_again(toy):
    """``--restart`` (``Manifests(restart=True)``) runs both finished stages again. Catches the manifests read
    anyway, and the option missing."""
    assert build_parser("").parse_args(["--restart"]).restart and not build_parser("").parse_args([]).restart
    launch = FakeStages()
    pipeline(toy, launch)
    launch.ran.clear()
    pipeline(toy, launch, restart=True)
    assert launch.stages() == ["sft", "rm"]


def test_a_stopped_fit_resumes_from_its_last_checkpoint_and_never_from_an_older_runs(toy, capsys):
    """SFT killed after writing ``last.ckpt``: run again, it resumes from it (``--ckpt_path``), logging to the same
    TensorBoard version, and the reward model then runs. Its setting changed and killed before any checkpoint, the
    next run starts it from scratch: the checkpoint left is of the older settings. Catches a stopped stage started
    over (or skipped), and a checkpoint of other settings, or older than the run, resumed from."""
    launch = FakeStages()
    launch.stop = {"sft"}
    with pytest.raises(SystemExit, match="exit status 137"):
        pipeline(toy, launch)
    launch.stop = set()
    launch.ran.clear()
    pipeline(toy, launch)
    last = toy.outputs / "sft" / "tensorboard" / "version_0" / "checkpoints" / "last.ckpt"
    assert launch.stages() == ["sft", "rm"]
    assert option(launch.ran[0], "--ckpt_path") == str(last)
    assert option(launch.ran[0], "--trainer.logger.init_args.version") == "version_0"
    assert f"stage sft: stopped before it finished, resumes from {last}" in capsys.readouterr().out

    launch.stop, launch.checkpoint = {"sft"}, False
    with pytest.raises(SystemExit):
        pipeline(toy, launch, sft_lr="1e-3")
    launch.stop = set()
    launch.ran.clear()
    pipeline(toy, launch, sft_lr="1e-3")
    assert option(launch.ran[0], "--ckpt_path") is None
    assert "stage sft: runs again from the start, it stopped before it finished" in capsys.readouterr().out


def test_a_stopped_sample_carries_on_from_its_partial_output(tmp_path, capsys):
    """``sample`` killed part-way: run again with the same policy and prompts, it carries on from its partial output
    (``--restart`` dropped); done, it is skipped. Catches a stopped sample started over, or carried on over another
    policy's samples."""
    policy, prompts = tmp_path / "sft" / "hf", tmp_path / "prompts.jsonl"
    policy.mkdir(parents=True)
    (policy / "model.safetensors").write_text("weights")
    prompts.write_text('{"prompt": "Reverse: ab"}\n')
    argv = sample_argv(policy, prompts, tmp_path / "comparisons.jsonl", k=2, temperature=1.0, seed=0, round_=1)
    launch, manifests = FakeStages(), Manifests(tmp_path / "stages")
    runner = StageRunner(1, tmp_path / "logs", launch, manifests)
    launch.stop = {"comparisons"}
    with pytest.raises(SystemExit):
        runner.together({"comparisons": argv})
    launch.stop = set()
    runner.together({"comparisons": argv})
    assert "--restart" in launch.ran[0] and "--restart" not in launch.ran[1]
    assert "stage comparisons: stopped before it finished, resumes from" in capsys.readouterr().out

    (policy / "model.safetensors").write_text("weights trained again")
    (tmp_path / "comparisons.jsonl.partial").write_text("half\n")
    runner.together({"comparisons": argv})
    assert "--restart" in launch.ran[2]
