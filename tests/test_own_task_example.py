"""The README's worked example of a task of one's own (examples/own_task: the Caesar shift): its judge, its data
generator, and ``lightning-rlhf pipeline`` running it with only the judge as the user's code; SFT and the reward
model on one's own task train for passes over the data, the toy for its configs' steps."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.own_task import make_data
from examples.own_task.judge import score, shifted

REPO = Path(__file__).resolve().parents[1]


def test_judge_gives_the_share_of_right_positions_over_the_longer_string():
    """Shifted, "hello" is "ifmmp". Worked by hand: "ifmmp" 5/5 = 1; "ifmmo" (last letter unshifted, the
    demonstrations' error) 4/5 = 0.8; "ifmm" 4 right over max(5, 4) = 0.8; "ifmmpp" 5 right over max(5, 6) = 5/6;
    "" 0; "xyz" wraps to "yza" (1.0) and " ifmmp " is stripped (1.0). Catches: no wrap at z ("yz{"), dividing by the
    answer's length only ("ifmmpp" would score 1.0), comparing letters as sets rather than by position ("fimmp")."""
    prompt = "Shift: hello\n"
    assert shifted("hello") == "ifmmp"
    assert score(prompt, "ifmmp") == 1.0 and score(prompt, " ifmmp ") == 1.0
    assert score(prompt, "ifmmo") == pytest.approx(0.8) and score(prompt, "ifmm") == pytest.approx(0.8)
    assert score(prompt, "ifmmpp") == pytest.approx(5 / 6) and score(prompt, "") == 0.0
    assert score(prompt, "fimmp") == pytest.approx(3 / 5)
    assert score("Shift: xyz\n", "yza") == 1.0
    with pytest.raises(ValueError, match="not a Caesar-shift prompt"):
        score("Reverse: abc\n", "cba")


def test_make_data_writes_demonstrations_with_the_systematic_error_and_unseen_prompts(tmp_path):
    """400 demonstrations at error rate 0.5: each is either the shifted word or the shifted word with its last letter
    left unshifted (the judge's (n-1)/n), the erroneous share within 0.4-0.6 (binomial sd 0.025); 300 prompts, all
    distinct and none a demonstration's; the same seed writes the same files. Catches: the error not systematic (any
    other corruption), the error rate ignored, prompts leaking demonstrations (SFT would have seen the evaluation's
    answers) and an unseeded generator."""
    out = tmp_path / "data"
    make_data.main(["--output", str(out), "--demonstrations", "400", "--prompts", "300", "--seed", "3"])
    demonstrations = [json.loads(line) for line in (out / "demonstrations.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(demonstrations) == 400 and len(prompts) == 300 == len(set(prompts))
    wrong = 0
    for record in demonstrations:
        word = record["prompt"].removeprefix("Shift: ").strip()
        if record["response"] != shifted(word):
            assert record["response"] == shifted(word)[:-1] + word[-1]
            assert score(record["prompt"], record["response"]) == pytest.approx((len(word) - 1) / len(word))
            wrong += 1
    assert 0.4 <= wrong / 400 <= 0.6
    assert not {record["prompt"] for record in demonstrations} & set(prompts)
    again = tmp_path / "again"
    make_data.main(["--output", str(again), "--demonstrations", "400", "--prompts", "300", "--seed", "3"])
    for name in ("demonstrations.jsonl", "prompts.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


class Stop(Exception):
    pass


def recorded_fits(argv: list[str], monkeypatch, tmp_path: Path) -> dict[str, list[str]]:
    """The ``lightning-rlhf`` arguments of the pipeline's stages up to PPO, run by nobody: sampling writes 100
    comparison records, and the pipeline stops once PPO's command is built."""
    from lightning_rlhf.commands.pipeline import loop as pipeline

    commands: dict[str, list[str]] = {}

    def record(stage_commands: dict[str, list[str]], jobs: int, logs: Path, launch, finished) -> dict[str, float]:
        commands.update(stage_commands)
        if "comparisons" in stage_commands:
            output = Path(stage_commands["comparisons"][stage_commands["comparisons"].index("--output") + 1])
            output.write_text(
                "".join(
                    json.dumps({"prompt": f"Shift: w{i}\n", "responses": ["a", "b"], "ranks": [0, 1]}) + "\n"
                    for i in range(100)
                )
            )
        if "ppo" in stage_commands:
            raise Stop
        return {}

    monkeypatch.setattr(pipeline, "side_by_side", record)
    with pytest.raises(Stop):
        pipeline.main(["--outputs", str(tmp_path / "out"), "--stages", "sft", "rm", "ppo", *argv])
    return commands


def overrides(command: list[str], name: str) -> list[str]:
    return [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]


def test_own_task_trains_for_passes_validated_each_pass_and_stopped_early_the_toy_for_its_steps(monkeypatch, tmp_path):
    """On one's own task, 200 demonstrations: one SFT pass (batch 32, 0.05 held out) is 190 / 32 = 5.9375 steps, so
    the default 60 passes are ceil(356.25) = 357 steps, the schedule 357 long, validated every round(5.9375) = 6
    steps, with EarlyStopping (patience 10) and BestWeights on val/loss (min). The reward model on the 100 comparison
    records (batch 64, 0.1 held out: 90 / 64 = 1.40625 steps a pass) for --rm_passes 3 is ceil(4.21875) = 5 steps,
    validated every step, both callbacks on val/accuracy (max), patience 3. SFT's learning rate is OWN_SFT_LR, 3e-4;
    PPO (its configs' rollouts, no early stop) exports its best validation by the judge, BestWeights on
    val/objective/judge (max). The toy run (no --demonstrations) keeps its configs' steps and learning rate: no step
    or lr override, no callback added. Catches: the passes counted over every record rather than the training share,
    the toy's commands changed, --rm_passes ignored, the schedule left at the config's length (the learning rate
    would not decay), a callback watching the wrong metric or direction (an RM stopped when its accuracy rises, or
    its worst weights exported), PPO exporting its last policy (no BestWeights) or one chosen by the reward model's
    score, and the own-task lr not reaching SFT."""
    make_data.main(["--output", str(tmp_path), "--demonstrations", "200", "--prompts", "60"])
    own = recorded_fits(
        [
            "--demonstrations",
            str(tmp_path / "demonstrations.jsonl"),
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--judge",
            "examples.own_task.judge.score",
            "--eval_prompts",
            "10",
            "--rm_passes",
            "3",
        ],
        monkeypatch,
        tmp_path,
    )
    assert overrides(own["sft"], "trainer.max_steps") == [str(math.ceil(60 * 190 / 32))] == ["357"]
    assert overrides(own["sft"], "trainer.val_check_interval") == ["6"]
    assert overrides(own["sft"], "model.init_args.scheduler.init_args.total_iters") == ["357"]
    assert overrides(own["rm"], "trainer.max_steps") == ["5"]
    assert overrides(own["rm"], "trainer.val_check_interval") == ["1"]
    for stage, monitor, mode, patience in (("sft", "val/loss", "min", "10"), ("rm", "val/accuracy", "max", "3")):
        added = overrides(own[stage], "trainer.callbacks+")
        assert added == ["lightning.pytorch.callbacks.EarlyStopping", "lightning_rlhf.training.callbacks.BestWeights"]
        assert overrides(own[stage], "trainer.callbacks.monitor") == [monitor, monitor]
        assert overrides(own[stage], "trainer.callbacks.mode") == [mode, mode]
        assert overrides(own[stage], "trainer.callbacks.patience") == [patience]
    assert overrides(own["sft"], "model.init_args.optimizer.init_args.lr") == ["0.0003"]
    assert overrides(own["ppo"], "trainer.callbacks+") == ["lightning_rlhf.training.callbacks.BestWeights"]
    assert overrides(own["ppo"], "trainer.callbacks.monitor") == ["val/objective/judge"]
    assert overrides(own["ppo"], "trainer.callbacks.mode") == ["max"]
    toy = recorded_fits(["--rank_prompts", "100"], monkeypatch, tmp_path)
    for stage in ("sft", "rm", "ppo"):
        assert not overrides(toy[stage], "trainer.max_steps")
        assert not overrides(toy[stage], "trainer.val_check_interval")
        assert not overrides(toy[stage], "model.init_args.optimizer.init_args.lr")
        assert not any(arg.startswith("--trainer.callbacks") for arg in toy[stage])


@pytest.mark.slow
def test_pipeline_runs_the_worked_example_with_only_the_users_judge(tmp_path):
    """The README's worked example, shrunk: make_data.py (60 demonstrations, 40 prompts) then ``lightning-rlhf
    pipeline --judge examples.own_task.judge.score`` from the clone's root, SFT and DPO 2 steps each (the stages that
    reach the judge from another process, the sampler, and in this one, the evaluation; rm / ppo / grpo on a task of
    one's own are tests/test_pipeline.py's). Catches: the example's files or judge path not what the pipeline reads
    (a generator writing elsewhere or other fields, a judge module that does not import from the clone's root)."""
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [
            sys.executable,
            "examples/own_task/make_data.py",
            "--output",
            str(data),
            "--demonstrations",
            "60",
            "--prompts",
            "40",
        ],
        cwd=REPO,
        env=env,
        check=True,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_rlhf",
            "pipeline",
            "--demonstrations",
            str(data / "demonstrations.jsonl"),
            "--prompts",
            str(data / "prompts.jsonl"),
            "--judge",
            "examples.own_task.judge.score",
            "--stages",
            "sft",
            "dpo",
            "--max_steps",
            "2",
            "--k",
            "2",
            "--eval_prompts",
            "6",
            "--rank_prompts",
            "16",
            "--outputs",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "pipeline" / "summary.json").read_text())
    assert summary["judge"] == "examples.own_task.judge.score"
    assert summary["stages"] == ["sft", "dpo"] and summary["held_out_prompts"] == 6
    for stage in ("sft", "dpo"):
        assert 0 <= summary[stage]["gold_greedy"] <= 1 and 0 <= summary[stage]["gold_sampled"] <= 1
    ranked = (tmp_path / "out" / "pipeline" / "comparisons.jsonl").read_text().splitlines()
    assert all(json.loads(line)["prompt"].startswith("Shift: ") for line in ranked)
