"""``lightning-rlhf pipeline`` (and scripts/pipeline.py, the README's main job): every stage through the CLI, evaluated
on held-out prompts; people instead of a judge."""

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from lightning_rlhf.commands.pipeline.argv import DEFAULT_STAGES, OWN_SFT_LR

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
JUDGE_LOG = "PIPELINE_TEST_JUDGE_LOG"


def stage_callbacks(outputs: Path, stage: str) -> dict[str, dict]:
    """The callbacks of ``stage``'s fit as its saved config lists them: class name -> init_args."""
    config = yaml.safe_load((outputs / stage / "tensorboard" / "version_0" / "config.yaml").read_text())
    listed = config["trainer"]["callbacks"]
    return {entry["class_path"].rpartition(".")[2]: entry.get("init_args", {}) for entry in listed}


def shout_judge(prompt: str, response: str) -> float:
    """The test's own task, not the toy: "Shout: abc" is answered "ABC"; the share of the answer's characters right.
    Every process that calls it writes its id once to the file named by $PIPELINE_TEST_JUDGE_LOG."""
    if JUDGE_LOG in os.environ and not getattr(shout_judge, "logged", False):
        with open(os.environ[JUDGE_LOG], "a") as log:
            log.write(f"{os.getpid()}\n")
        shout_judge.logged = True
    answer = prompt.removeprefix("Shout: ").strip().upper()
    return sum(a == b for a, b in zip(answer, response.strip(), strict=False)) / len(answer)


@pytest.mark.slow
def test_pipeline_chains_every_stage_and_round_and_reports_gold_scores_win_rates_and_plots(tmp_path):
    """A short run (20 steps a stage, 64 ranked prompts a round; labeller noise breaks the ties of a barely trained
    model's samples) with two rounds and the over-optimised run, seed 1 (every stage's model and data seeded
    alike): each stage must read the previous stage's export (round 2's reward model starts from the first round's,
    round 2's PPO from the first round's policy, with SFT as reference; round 2's DPO from the first round's DPO
    policy, on its samples, with SFT as reference), and the summary must hold the evaluation of
    every model, the win rates and Elo against SFT, both reward models' accuracy and the best-of-n curve."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "pipeline.py"),
            "--outputs",
            str(tmp_path),
            "--max_steps",
            "20",
            "--k",
            "4",
            "--noise",
            "0.2",
            "--eval_prompts",
            "16",
            "--rank_prompts",
            "64",
            "--rounds",
            "2",
            "--overoptimization",
            "--seeds",
            "1",
            "--stages",
            *DEFAULT_STAGES,
            "ppo_ptx",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "pipeline" / "summary.json").read_text())
    models = ("sft", "ppo", "ppo_round2", "ppo_gold_reward", "dpo", "dpo_round2", "ppo_overoptimized", "ppo_ptx")
    for stage in models:
        entry = summary[stage]
        assert 0 <= entry["gold_greedy"] <= 1 and 0 <= entry["gold_sampled"] <= 1
        assert 0 <= entry["second_skill"] <= 1  # the toy's second skill, which RL never trains on
        assert 0 <= entry["win_rate_vs_sft"] <= 1
        low, high = entry["elo_ci"]
        assert low <= entry["elo"] <= high
    assert summary["sft"]["win_rate_vs_sft"] == 0.5 and summary["sft"]["elo"] == 1000
    for name in ("reward_model", "reward_model_round2"):
        assert summary[name]["rm_eval_pairs"] > 0
    assert summary["best_of_n"]["n"] == list(range(1, 17)) and len(summary["best_of_n"]["gold"]) == 16
    assert summary["held_out_prompts"] == 16 and set(summary["seconds"]) == {
        "sft",
        "comparisons",
        "rm",
        "ppo",
        "ppo_gold_reward",
        "ppo_overoptimized",
        "ppo_ptx",
        "dpo",
        "comparisons_round2",
        "rm_round2",
        "ppo_round2",
        "dpo_comparisons_round2",
        "dpo_round2",
        "evaluation",
    }
    assert AutoConfig.from_pretrained(tmp_path / "rm" / "hf").architectures == ["LlamaForSequenceClassification"]
    for stage in ("ppo", "ppo_round2", "ppo_gold_reward", "dpo"):
        assert AutoConfig.from_pretrained(tmp_path / stage / "hf").architectures == ["LlamaForCausalLM"]
    round2 = yaml.safe_load((tmp_path / "ppo_round2" / "tensorboard" / "version_0" / "hparams.yaml").read_text())
    assert round2["model_name_or_path"] == str(tmp_path / "ppo" / "hf")
    assert round2["ref_model_name_or_path"] == str(tmp_path / "sft" / "hf")
    assert round2["reward_model_name_or_path"] == str(tmp_path / "rm_round2" / "hf")
    dpo_round2 = yaml.safe_load((tmp_path / "dpo_round2" / "tensorboard" / "version_0" / "hparams.yaml").read_text())
    assert dpo_round2["model_name_or_path"] == str(tmp_path / "dpo" / "hf")
    assert dpo_round2["ref_model_name_or_path"] == str(tmp_path / "sft" / "hf")
    dpo_data = yaml.safe_load((tmp_path / "dpo_round2" / "tensorboard" / "version_0" / "config.yaml").read_text())
    assert dpo_data["data"]["init_args"]["train_path"] == str(tmp_path / "pipeline" / "dpo_comparisons_round2.jsonl")
    rm_round2 = yaml.safe_load((tmp_path / "rm_round2" / "tensorboard" / "version_0" / "hparams.yaml").read_text())
    assert rm_round2["model_name_or_path"] == str(tmp_path / "rm" / "hf")  # warm start from round 1's reward model
    rounds = (tmp_path / "pipeline").glob("comparisons*.jsonl")
    lines = {path.name: len(path.read_text().splitlines()) for path in rounds}
    assert lines["comparisons_up_to_round2.jsonl"] == lines["comparisons.jsonl"] + lines["comparisons_round2.jsonl"]
    ptx = yaml.safe_load((tmp_path / "ppo_ptx" / "tensorboard" / "version_0" / "config.yaml").read_text())
    assert ptx["model"]["init_args"]["ptx_coef"] > 0  # PPO-ptx on the second skill's texts, against round 1's RM
    assert ptx["data"]["init_args"]["pretrain_path"] == "toy:second_skill_texts"
    assert ptx["model"]["init_args"]["reward_model_name_or_path"] == str(tmp_path / "rm" / "hf")
    for png in ("overoptimization.png", "win_rates.png", "alignment_tax.png"):
        assert (tmp_path / "pipeline" / png).read_bytes().startswith(PNG)
    assert "Gold-judge scores on held-out prompts" in result.stdout and "skill 2" in result.stdout
    assert "BestWeights" not in stage_callbacks(tmp_path, "ppo")  # the toy keeps its last policy, as the README says
    assert "demonstrations" not in summary  # nor does its summary change
    sft_config = yaml.safe_load((tmp_path / "sft" / "tensorboard" / "version_0" / "config.yaml").read_text())
    assert sft_config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.003  # sft.yaml's, not OWN_SFT_LR


def test_seeds_are_aggregated_as_means_with_min_max_spreads():
    """Two seeds: SFT gold sampled 0.8 and 0.9 -> mean 0.85, spread [0.8, 0.9]; non-numbers (intervals, curves)
    stay in the per-seed runs only."""
    from lightning_rlhf.commands.pipeline.report import aggregate

    common = {
        "held_out_prompts": 3,
        "sampling_temperature": 1.0,
        "labeller_noise": 0.0,
        "k": 8,
        "ranked_prompts_per_round": 10,
        "rounds": 1,
        "curves": {},
        "best_of_n": {},
    }
    runs = [
        {
            **common,
            "seed": seed,
            "sft": {"gold_sampled": score, "elo_ci": [1, 2]},
            "reward_model": {"rm_pairwise_accuracy_vs_gold": accuracy},
        }
        for seed, score, accuracy in ((0, 0.8, 0.7), (1, 0.9, 0.9))
    ]
    summary = aggregate(runs)
    assert summary["seeds"] == [0, 1] and summary["runs"] == runs
    assert set(summary["sft"]) == {"gold_sampled", "gold_sampled_spread"}
    assert summary["sft"]["gold_sampled"] == pytest.approx(0.85) and summary["sft"]["gold_sampled_spread"] == [0.8, 0.9]
    assert summary["reward_model"]["rm_pairwise_accuracy_vs_gold"] == pytest.approx(0.8)
    assert "curves" not in summary and "best_of_n" not in summary


@pytest.mark.slow
def test_pipeline_runs_the_users_own_task_with_their_judge_and_only_the_stages_asked(tmp_path):
    """A string task of the test's own ("Shout: abc" -> "ABC", judged by ``shout_judge``): 48 demonstrations, 40
    prompts of which --eval_prompts 8 are held out by the seeded share, --stages sft rm ppo, 4 steps a stage. Catches:
    the toy's demonstrations, prompts or gold judge used instead of the user's (SFT's train_path, PPO's train_path and
    judge_fn, the held-out prompts, and the judge called from the sampling, PPO and evaluation processes; the toy's
    gold judge raises on a prompt that is not the toy's, so any place still judging with it fails the run), a held-out
    prompt trained on, stages run that were not asked (DPO, PPO against the judge), and no diagnosis."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefgh", k=rng.randint(3, 5))) for _ in range(88)]
    demonstrations = tmp_path / "demos.jsonl"
    demonstrations.write_text(
        "".join(json.dumps({"prompt": f"Shout: {w}\n", "response": w.upper()}) + "\n" for w in words[:48])
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Shout: {w}\n"}) + "\n" for w in words[48:]))
    judge_log = tmp_path / "judge_calls.txt"
    outputs = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "pipeline.py"),
            "--outputs",
            str(outputs),
            "--max_steps",
            "4",
            "--k",
            "4",
            "--noise",
            "0.2",
            "--eval_prompts",
            "8",
            "--rank_prompts",
            "64",
            "--seeds",
            "1",
            "--demonstrations",
            str(demonstrations),
            "--prompts",
            str(prompts),
            "--judge",
            "tests.test_pipeline.shout_judge",
            "--stages",
            "sft",
            "rm",
            "ppo",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), JUDGE_LOG: str(judge_log)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((outputs / "pipeline" / "summary.json").read_text())
    assert summary["judge"] == "tests.test_pipeline.shout_judge" and summary["stages"] == ["sft", "rm", "ppo"]
    assert set(summary["seconds"]) == {"sft", "comparisons", "rm", "ppo", "evaluation"}
    assert "dpo" not in summary and "ppo_gold_reward" not in summary and summary["held_out_prompts"] == 8
    assert "second_skill" not in summary["sft"]  # the toy's second skill is no part of the user's task
    assert summary["reward_model"]["rm_eval_pairs"] > 0 and 0 <= summary["ppo"]["gold_sampled"] <= 1
    assert isinstance(summary["diagnosis"], dict) and "Diagnosis" in result.stdout
    # every demonstration is the exact answer, so the judge scores each 1.0: what SFT is compared with
    assert summary["demonstrations"] == {"gold_mean": 1.0, "records": 48}
    # a pass (48 demonstrations less 5 % held out, batches of 32) is round(1.43) = 1 step: a validation after each of 4
    assert len(summary["curves"]["sft"]["val_loss"]) == 4 and set(summary["curves"]) == {"sft", "ppo"}
    assert len(set(judge_log.read_text().split())) >= 3  # the labeller, PPO's judge_fn and the evaluation
    trained = {json.loads(line)["prompt"] for line in (outputs / "pipeline" / "prompts.jsonl").read_text().splitlines()}
    assert len(trained) == 32 and trained <= {f"Shout: {w}\n" for w in words[48:]}
    ppo = yaml.safe_load((outputs / "ppo" / "tensorboard" / "version_0" / "hparams.yaml").read_text())
    assert ppo["judge_fn"] == "tests.test_pipeline.shout_judge"
    sft_config = yaml.safe_load((outputs / "sft" / "tensorboard" / "version_0" / "config.yaml").read_text())
    assert sft_config["data"]["init_args"]["train_path"] == str(demonstrations)
    assert sft_config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == OWN_SFT_LR == 3e-4  # not sft.yaml's
    ppo_config = yaml.safe_load((outputs / "ppo" / "tensorboard" / "version_0" / "config.yaml").read_text())
    assert ppo_config["data"]["init_args"]["train_path"] == str(outputs / "pipeline" / "prompts.jsonl")
    # the policy of PPO's best validation by the judge is exported (validated on prompts.jsonl, no held-out prompt)
    assert stage_callbacks(outputs, "ppo")["BestWeights"] == {"monitor": "val/objective/judge", "mode": "max"}


def option(argv: list[str], name: str) -> list[str]:
    """The values of every ``--name=value`` in ``argv``, in order."""
    return [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]


def test_reward_model_and_dpo_argv_read_their_config_sfts_export_and_the_comparisons(tmp_path):
    """The pure argv of the reward model and DPO, seed 3: each a ``fit`` of its own config under --configs, from SFT's
    export, on the comparisons file, writing (logs and export) under its own stage directory, seeded alike; the
    reward model's rewards centred on the toy's demonstrations when the user gave none. Catches a stage's config
    swapped (rm.yaml / dpo.yaml), a stage reading another stage's export or another comparisons file, an export
    written into another stage's directory (the next stage would read the wrong model), and the seed not reaching
    the model or the data."""
    from lightning_rlhf.commands.pipeline.argv import Run, dpo_argv, rm_argv

    configs, outputs, comparisons = tmp_path / "configs", tmp_path / "out", tmp_path / "out" / "pipeline" / "c.jsonl"
    run = Run(configs, outputs, seed=3)
    for stage, argv in (
        ("rm", rm_argv(run, outputs / "sft" / "hf", comparisons, None)),
        ("dpo", dpo_argv(run, outputs / "sft" / "hf", comparisons)),
    ):
        assert argv[:3] == ["fit", "--config", str(configs / f"{stage}.yaml")]
        assert option(argv, "model.init_args.model_name_or_path") == [str(outputs / "sft" / "hf")]
        assert option(argv, "data.init_args.train_path") == [str(comparisons)]
        assert option(argv, "model.init_args.export_dir") == [str(outputs / stage / "hf")]
        assert option(argv, "trainer.default_root_dir") == [str(outputs / stage)]
        assert option(argv, "seed_everything") == option(argv, "data.init_args.seed") == ["3"]
        assert not option(argv, "trainer.max_steps")  # the toy run keeps its config's steps
    assert option(rm_argv(run, outputs / "sft" / "hf", comparisons, None), "data.init_args.normalize_path") == [
        "toy:demonstrations"
    ]


def test_ppo_ptx_is_ppo_against_the_reward_model_on_its_config_and_the_users_texts_when_given(tmp_path):
    """``ppo_ptx`` runs ppo_ptx.yaml (PPO plus ptx_coef, on the toy's second skill's texts) from SFT against the reward
    model; --ptx_texts replaces the texts for ppo_ptx only. Catches PPO-ptx running ppo.yaml (no ptx term at all), the
    user's texts reaching PPO (or not reaching PPO-ptx), and PPO-ptx against another reward."""
    from lightning_rlhf.commands.pipeline.argv import Run, against_rm_argv

    configs, outputs = tmp_path / "configs", tmp_path / "out"
    toy = against_rm_argv(Run(configs, outputs, seed=0), outputs / "sft" / "hf", None)
    own = against_rm_argv(Run(configs, outputs, seed=0, ptx_texts="texts.jsonl"), outputs / "sft" / "hf", None)
    assert toy["ppo_ptx"][:3] == ["fit", "--config", str(configs / "ppo_ptx.yaml")]
    assert option(toy["ppo_ptx"], "model.init_args.reward_model_name_or_path") == [str(outputs / "rm" / "hf")]
    assert option(toy["ppo_ptx"], "model.init_args.export_dir") == [str(outputs / "ppo_ptx" / "hf")]
    assert not option(toy["ppo_ptx"], "data.init_args.pretrain_path")  # the config's: toy:second_skill_texts
    assert option(own["ppo_ptx"], "data.init_args.pretrain_path") == ["texts.jsonl"]
    assert not option(own["ppo"], "data.init_args.pretrain_path")
    ptx_config = yaml.safe_load((REPO / "configs" / "ppo_ptx.yaml").read_text())
    assert ptx_config["model"]["init_args"]["ptx_coef"] > 0
    assert ptx_config["data"]["init_args"]["pretrain_path"] == "toy:second_skill_texts"


def test_asked_keeps_only_the_stages_of_stages_and_always_sampling_and_the_later_rounds():
    """``--stages sft rm``: of SFT, the reward model, DPO and PPO only SFT and the reward model run; the sampling
    stage (``comparisons``) and round 2's reward model, not names --stages takes, always run; the order is kept.
    Catches --stages ignored (DPO trained though not asked) and a filter that drops what is not in --stages at all
    (no samples to rank, no later rounds)."""
    from lightning_rlhf.commands.pipeline.argv import asked

    commands = {name: [name] for name in ("sft", "comparisons", "rm", "dpo", "ppo", "rm_round2")}
    assert list(asked(commands, ["sft", "rm"])) == ["sft", "comparisons", "rm", "rm_round2"]


def test_max_steps_wins_over_a_stages_own_steps_and_the_rl_stages_keep_their_schedule(tmp_path):
    """--max_steps 8 over round 2's reward model (its own 1,200 steps): 8 steps, validated at the end (every 8), the
    schedule 8 long. PPO with --max_steps 8: 8 steps, validated every 8 // 4 = 2 (a rollout is 4 optimiser steps), its
    config's schedule untouched. Catches ``steps or max_steps`` (--max_steps ignored where a stage has its own steps:
    a short test run trains for 1,200), a schedule override on the RL stages (their configs have no scheduler, fit
    would fail), and PPO validated only once at the end of a short run (no validation curve)."""
    from lightning_rlhf.commands.pipeline.argv import Run, ppo_round_argv, rm_round_argv

    run = Run(tmp_path / "configs", tmp_path / "out", seed=0, max_steps=8)
    rm = rm_round_argv(run, 2, tmp_path / "out" / "rm" / "hf", tmp_path / "all.jsonl", None)
    assert option(rm, "trainer.max_steps") == ["8"] and option(rm, "trainer.val_check_interval") == ["8"]
    assert option(rm, "model.init_args.scheduler.init_args.total_iters") == ["8"]
    ppo = ppo_round_argv(run, 2, tmp_path / "out" / "ppo" / "hf", tmp_path / "out" / "sft" / "hf", None)
    assert option(ppo, "trainer.max_steps") == ["8"] and option(ppo, "trainer.val_check_interval")[-1] == "2"
    assert not option(ppo, "model.init_args.scheduler.init_args.total_iters")


def test_a_later_rounds_ppo_continues_the_last_policy_against_its_rounds_reward_model_with_sft_as_reference(tmp_path):
    """Round 3's PPO (the judge watched): the policy it trains is round 2's, its reference SFT, its reward model round
    3's, ``judge_fn`` the judge; round 3's reward model starts from round 2's on every comparison so far, at
    RM_ROUND_LR for RM_ROUND_STEPS. Catches the round's PPO restarting from SFT, its reference left unset (it defaults
    to the policy it starts from: round 2's, not SFT), a stale reward model (round 1's), and the round's reward model
    retrained from SFT (it fell from 0.885 to 0.756 against the gold judge that way)."""
    from lightning_rlhf.commands.pipeline.argv import RM_ROUND_LR, RM_ROUND_STEPS, Run, ppo_round_argv, rm_round_argv

    out = tmp_path / "out"
    run = Run(tmp_path / "configs", out, seed=0)
    ppo = ppo_round_argv(run, 3, out / "ppo_round2" / "hf", out / "sft" / "hf", "pkg.judge")
    assert option(ppo, "model.init_args.model_name_or_path") == [str(out / "ppo_round2" / "hf")]
    assert option(ppo, "model.init_args.ref_model_name_or_path") == [str(out / "sft" / "hf")]
    assert option(ppo, "model.init_args.reward_model_name_or_path") == [str(out / "rm_round3" / "hf")]
    assert option(ppo, "model.init_args.judge_fn") == ["pkg.judge"] and ppo[2] == str(tmp_path / "configs" / "ppo.yaml")
    rm = rm_round_argv(run, 3, out / "rm_round2" / "hf", tmp_path / "all.jsonl", None)
    assert option(rm, "model.init_args.model_name_or_path") == [str(out / "rm_round2" / "hf")]
    assert option(rm, "data.init_args.train_path") == [str(tmp_path / "all.jsonl")]
    assert option(rm, "model.init_args.optimizer.init_args.lr") == [str(RM_ROUND_LR)]
    assert option(rm, "trainer.max_steps") == [str(RM_ROUND_STEPS)]


def test_sample_argv_ranks_k_samples_of_the_policy_with_a_new_seed_each_round(tmp_path):
    """Seed 2: round 1 samples with seed 1002, round 2 with 2002, both ranked by the toy's judge (named ``gold`` to
    ``sample``) with the labeller's noise, K = 4, into the file asked, starting over (--restart). Catches each round
    sampling with the same seed (round 2's policy would be judged on the samples' luck of round 1), the toy's gold
    judge passed under its import path (``sample`` would not find it), and a killed earlier run's samples of an older
    policy kept (no --restart)."""
    from lightning_rlhf.commands.pipeline.argv import GOLD, ranking_argv, sample_argv

    def argv(round_: int) -> list[str]:
        ranking = ranking_argv(GOLD, 0.2)
        return sample_argv(
            tmp_path / "sft",
            tmp_path / "p.jsonl",
            tmp_path / "s.jsonl",
            k=4,
            temperature=1.0,
            seed=2,
            round_=round_,
            ranking=ranking,
        )

    first, second = argv(1), argv(2)
    assert first[first.index("--seed") + 1] == "1002" and second[second.index("--seed") + 1] == "2002"
    for flag, value in (("--model", str(tmp_path / "sft")), ("--judge", "gold"), ("--noise", "0.2"), ("--k", "4")):
        assert first[first.index(flag) + 1] == value
    assert first[first.index("--output") + 1] == str(tmp_path / "s.jsonl") and first[-1] == "--restart"


def test_stages_are_checked_before_anything_runs(tmp_path):
    """An unknown stage is named with the known ones; PPO without a reward model to train against, SFT skipped with
    no SFT export to reuse, and rounds without PPO are refused; the default stages pass. Catches a typo in --stages
    silently running nothing (or the toy) and a missing stage failing only after minutes of training."""
    from lightning_rlhf.commands.pipeline.options import stage_error

    assert "unknown reward, sft2; choose among sft, rm, ppo, grpo" in stage_error(
        ["reward", "sft2"], 1, False, 1, tmp_path
    )
    assert "add rm to --stages" in stage_error(["sft", "grpo"], 1, False, 1, tmp_path)
    assert "add sft to --stages" in stage_error(["rm"], 1, False, 1, tmp_path)
    assert "needs rm and ppo (iterated RLHF) or dpo" in stage_error(["sft", "rm", "grpo"], 2, False, 1, tmp_path)
    assert stage_error(["sft", "dpo"], 2, False, 1, tmp_path) is None  # iterated DPO alone
    assert stage_error(list(DEFAULT_STAGES), 2, True, 3, tmp_path) is None
    (tmp_path / "sft" / "hf").mkdir(parents=True)
    (tmp_path / "rm" / "hf").mkdir(parents=True)
    assert stage_error(["ppo"], 1, False, 1, tmp_path) is None  # reuses both exports


def shout_task(tmp_path: Path, n_prompts: int = 12) -> list[str]:
    """The shout task's files under ``tmp_path``: 16 demonstrations and ``n_prompts`` prompts, and an SFT export
    already in ``tmp_path/out/sft/hf`` (the tiny model) for the pipeline to reuse. Returns the prompts' words."""
    rng = random.Random(1)
    words = ["".join(rng.choices("abcdefgh", k=4)) for _ in range(16 + n_prompts)]
    (tmp_path / "demos.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Shout: {w}\n", "response": w.upper()}) + "\n" for w in words[:16])
    )
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Shout: {w}\n"}) + "\n" for w in words[16:]))
    return words[16:]


def pipeline_args(tmp_path: Path, *more: str) -> list[str]:
    return [
        "--outputs",
        str(tmp_path / "out"),
        "--demonstrations",
        str(tmp_path / "demos.jsonl"),
        "--prompts",
        str(tmp_path / "prompts.jsonl"),
        "--eval_prompts",
        "4",
        "--max_steps",
        "2",
        *more,
    ]


@pytest.mark.slow
def test_people_stop_after_sampling_writes_what_label_reads_and_prints_the_commands_that_carry_on(
    tmp_path, tiny_model_dir, capsys
):
    """--label people on the user's task (no judge), SFT reused from OUTPUTS/sft/hf: 6 of the 8 training prompts (12
    less 4 held out) sampled K = 2 times, unranked, and the run stops. The printed ``label --input`` must name that
    file, which ``label``'s reader takes; a made-up labeller's labels (one per item, as the server appends them) put
    through the printed ``label --aggregate`` must land where the printed resume command's --comparisons points, and
    that command must be this run's without --label people. Catches: the samples written elsewhere than the printed
    path or ranked by a judge (``ranks`` present), held-out prompts sampled, the resume command stopping again (still
    --label people), naming another file, or losing the user's options; and stages past sampling run anyway."""
    from lightning_rlhf.commands import label
    from lightning_rlhf.commands.label.store import LabelStore, read_items
    from lightning_rlhf.commands.pipeline.loop import main

    words = shout_task(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(tiny_model_dir, out / "sft" / "hf")
    argv = pipeline_args(tmp_path, "--stages", "rm", "dpo", "--label", "people", "--k", "2", "--rank_prompts", "6")
    assert main(argv) is None
    printed = capsys.readouterr().out
    commands = [shlex.split(line) for line in printed.splitlines() if line.startswith("   lightning-rlhf ")]
    serve, aggregate, resume = commands
    samples = out / "pipeline" / "samples.jsonl"
    assert serve[:3] == ["lightning-rlhf", "label", "--input"] and serve[3] == str(samples)
    items = read_items(serve[3])
    assert len(items) == 6 and all(len(item["responses"]) == 2 for item in items)
    trained = {json.loads(line)["prompt"] for line in (out / "pipeline" / "prompts.jsonl").read_text().splitlines()}
    assert len(trained) == 8 and {item["prompt"] for item in items} <= trained <= {f"Shout: {w}\n" for w in words}
    assert all("ranks" not in json.loads(line) for line in samples.read_text().splitlines())
    assert not (out / "rm").exists() and not (out / "dpo").exists() and not (out / "pipeline" / "summary.json").exists()

    store = LabelStore(items, serve[serve.index("--output") + 1])
    for item in range(len(items)):
        store.add({"labeller": "ann", "item": item, "ranks": [0, 1]})
    store.close()
    assert aggregate[:3] == ["lightning-rlhf", "label", "--aggregate"]
    label.main(aggregate[2:])
    comparisons = Path(aggregate[aggregate.index("--output") + 1])
    assert len(comparisons.read_text().splitlines()) == 6
    assert resume[:2] == ["lightning-rlhf", "pipeline"] and "--label" not in resume and "people" not in resume
    assert resume[resume.index("--comparisons") + 1] == str(comparisons)
    assert resume[resume.index("--outputs") + 1] == str(out)
    assert resume[2:-4] == [arg for arg in argv[2:] if arg not in ("--label", "people")]  # the user's options kept


@pytest.mark.slow
def test_resume_from_comparisons_trains_the_reward_model_on_exactly_that_file_and_scores_with_it(
    tmp_path, tiny_model_dir, capfd
):
    """--comparisons with a hand-made file of 20 comparisons of prompts that are not in --prompts, no judge, --stages
    sft rm ppo with SFT already exported: SFT is reused, nothing is sampled, the reward model's data is that file (its
    config names it; its data report counts its 20 records of 20 distinct prompts across train and validation), PPO
    trains against it with no judge_fn, and the evaluation is the reward model's (its scores of each policy's greedy
    and sampled responses, win rates and Elo by them, its validation accuracy, PPO's KL curve), with no gold numbers
    and the note saying they need --judge. Catches: sampling and ranking again (a samples or
    comparisons file written, a 'sample' command run), the reward model trained on anything else (another train_path
    or count), SFT retrained over the export, and a judge-less run failing in the evaluation or faking gold keys."""
    from lightning_rlhf.commands.pipeline.loop import main

    shout_task(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(tiny_model_dir, out / "sft" / "hf")
    comparisons = tmp_path / "people.jsonl"
    comparisons.write_text(
        "".join(
            json.dumps({"prompt": f"Shout: zz{i}\n", "responses": [f"ZZ{i}", "zz"], "ranks": [0, 1]}) + "\n"
            for i in range(20)
        )
    )
    summary = main(pipeline_args(tmp_path, "--comparisons", str(comparisons), "--stages", "sft", "rm", "ppo"))
    printed = capfd.readouterr()
    assert "lightning-rlhf sample" not in printed.out and "lightning-rlhf fit --config" in printed.out
    assert not (out / "sft" / "tensorboard").exists()  # reused, not retrained
    written = {path.name for path in (out / "pipeline").iterdir()}
    assert written == {"prompts.jsonl", "summary.json", "win_rates.png", "stages"}  # stages: the stages' manifests
    assert {path.name for path in (out / "pipeline" / "stages").iterdir()} == {"rm.json", "ppo.json"}
    rm_config = yaml.safe_load((out / "rm" / "tensorboard" / "version_0" / "config.yaml").read_text())
    assert rm_config["data"]["init_args"]["train_path"] == str(comparisons)
    reports = [line for line in printed.err.splitlines() if line.startswith("ComparisonDataModule: ")]
    train, val = (int(n) for n in reports[0].split()[1:5:3])
    assert train + val == 20 and f"of {train} / {val} distinct prompts" in reports[0]
    assert summary["comparisons"] == str(comparisons) and "--judge" in summary["evaluation_note"]
    assert {"rm_greedy", "rm_sampled", "win_rate_vs_sft", "elo"} <= set(summary["ppo"]) and "best_of_n" not in summary
    assert not any(key.startswith("gold") for key in summary["sft"]) and summary["sft"]["elo"] == 1000
    assert 0 <= summary["reward_model"]["val_accuracy_on_comparisons"] <= 1
    assert summary["curves"]["ppo"]["kl"] and "judge" not in summary["curves"]["ppo"]
    # no judge: PPO's export is its best validation by the KL-penalised reward (BestWeights fails on an unlogged name)
    assert stage_callbacks(out, "ppo")["BestWeights"] == {"monitor": "val/objective/rlhf_reward", "mode": "max"}
    assert set(summary["seconds"]) == {"rm", "ppo", "evaluation"}
    assert "gold numbers need --judge" in printed.out
    assert json.loads((out / "pipeline" / "summary.json").read_text())["sft"] == summary["sft"]


def test_who_ranks_and_who_judges_are_checked_before_anything_runs(tmp_path, capsys):
    """The user's task with neither a judge nor people is refused, naming both ways; people and --comparisons
    together, people with rounds or several seeds, people with nothing to train on the rankings, the judge's yardstick
    (ppo_gold_reward) without a judge, PPO-ptx on the user's task without their pretraining text (the toy's would
    train a skill of the toy into their model), and a --configs directory lacking a stage's config are refused too,
    each before SFT starts (no outputs written). Catches the toy's gold judge silently ranking a user's samples, and a
    run that cannot work failing only after training."""
    from lightning_rlhf.commands.pipeline.loop import main

    shout_task(tmp_path)
    refusals = {
        (): "needs --judge package.module.fn to rank the samples and score the models, or people to rank them",
        ("--label", "people", "--comparisons", "c.jsonl"): "give one of them",
        ("--label", "people", "--rounds", "2"): "runs one round of one seed",
        ("--label", "people", "--seeds", "0", "1"): "runs one round of one seed",
        ("--label", "people", "--stages", "sft", "ppo"): "ppo train against the reward model: add rm",
        ("--label", "people", "--stages", "sft"): "nothing trains on the rankings; add rm or dpo",
        ("--label", "people", "--stages", "sft", "rm", "ppo_gold_reward"): "ppo_gold_reward needs a judge",
        ("--label", "people", "--configs", str(tmp_path)): f"--configs {tmp_path}: no dpo.yaml, ppo.yaml, rm.yaml, "
        "sft.yaml there",
        ("--label", "people", "--stages", "sft", "rm", "ppo_ptx"): "ppo_ptx on your task needs its pretraining text: "
        "--ptx_texts",
    }
    for extra, message in refusals.items():
        with pytest.raises(SystemExit) as exit_:
            main(pipeline_args(tmp_path, *extra))
        assert exit_.value.code == 2 and message in " ".join(capsys.readouterr().err.split()), extra
    assert not (tmp_path / "out").exists()


# A stand-in for ``python -m lightning_rlhf``: records when it ran and with how many threads (OMP_NUM_THREADS, and
# torch's where torch is loaded), then exits with the status its first argument names, after a line of output (which
# a failure's message must show).
FAKE_STAGE = (
    "import os, sys, time; start = time.time(); time.sleep(1.0); print('stage output', sys.argv[2]); "
    "torch = sys.modules.get('torch'); threads = torch.get_num_threads() if torch else '-'; "
    "env = os.environ.get; open(sys.argv[3], 'w').write(f\"{start} {time.time()} {env('OMP_NUM_THREADS')} {threads} "
    "{env('STAGE_MARK')}\"); "
    "sys.exit(int(sys.argv[1]))"
)


def fake_stage(argv: list[str]) -> None:
    """``FAKE_STAGE`` as the warm launcher's entry (in place of ``lightning_rlhf.cli.main``)."""
    sys.argv = ["fake", *argv]
    exec(FAKE_STAGE)


@pytest.mark.parametrize("launcher", ["in_new_process", "warm"])
def test_stages_that_need_nothing_of_each_other_run_side_by_side_on_their_share_of_the_cores(
    tmp_path, monkeypatch, launcher
):
    """Two stages of 1 s each on 2 jobs over 2 cores: their runs overlap, each on 1 thread (OMP_NUM_THREADS, and
    torch's own count in a warm stage, forked from a process that had torch loaded) with its output in its log; one
    job runs them one after the other, with the caller's threads, output and environment (as they are when they
    run, not when the warm launcher's forkserver started). A failing stage (exit 3) raises only after its sibling
    has finished, naming the stage and its log and showing the log's end. Catches the stages run one after the
    other (no overlap), every stage given all the cores (oversubscribed; in a warm stage, torch's count left at the
    forked process's), output not sent to the log or to the caller's stdout, the forkserver's environment, and a
    failure lost or raised without its output."""
    from lightning_rlhf.commands.pipeline import launch as pipeline

    monkeypatch.setattr(pipeline, "cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if launcher == "warm":
        launch, torch_threads = pipeline.warm(entry=fake_stage), "1"
    else:
        launch, torch_threads = pipeline.in_new_process((sys.executable, "-c", FAKE_STAGE)), "-"

    def stage(name: str, status: int = 0) -> list[str]:
        return [str(status), name, str(tmp_path / f"{name}.times")]

    def runs(*names: str) -> list[tuple[float, float, str, str, str]]:
        out = []
        for name in names:
            start, end, threads, in_torch, mark = (tmp_path / f"{name}.times").read_text().split()
            out.append((float(start), float(end), threads, in_torch, mark))
        return out

    seconds = pipeline.side_by_side({"a": stage("a"), "b": stage("b")}, 2, tmp_path / "logs", launch)
    (a_start, a_end, a_threads, a_torch, _), (b_start, b_end, b_threads, b_torch, _) = runs("a", "b")
    assert max(a_start, b_start) < min(a_end, b_end)  # overlapping
    assert a_threads == b_threads == "1" and a_torch == b_torch == torch_threads and set(seconds) == {"a", "b"}
    assert "stage output a" in (tmp_path / "logs" / "a.log").read_text()

    monkeypatch.setenv("STAGE_MARK", "set-after-the-first-stages")  # a warm launcher's forkserver is running by now
    terminal, saved = (tmp_path / "terminal").open("w"), os.dup(1)
    os.dup2(terminal.fileno(), 1)  # this process's stdout now: where a stage run alone must write
    try:
        pipeline.side_by_side({"c": stage("c"), "d": stage("d")}, 1, tmp_path / "logs", launch)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        terminal.close()
    (c_start, c_end, c_threads, _, c_mark), (d_start, _, d_threads, _, _) = runs("c", "d")
    assert c_end <= d_start and c_threads == d_threads == "None" and c_mark == "set-after-the-first-stages"
    assert "stage output c" in (tmp_path / "terminal").read_text() and not (tmp_path / "logs" / "c.log").exists()

    with pytest.raises(SystemExit, match=r"stage f failed \(exit status 3\).*f\.log ends:\nstage output f"):
        pipeline.side_by_side({"e": stage("e"), "f": stage("f", 3)}, 2, tmp_path / "logs", launch)
    assert (tmp_path / "e.times").exists()  # the sibling ran to its end
