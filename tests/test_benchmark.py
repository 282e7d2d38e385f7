"""scripts/benchmark.py: the generate benchmark and the rows --json writes."""

import json

import pytest

from tests.helpers import REPO, run_python


@pytest.mark.slow
def test_generate_benchmark_writes_the_rows_it_prints_to_json(tmp_path):
    """A tiny ``generate`` run with the dynamic and static cache: ``--json`` holds exactly the rows the run printed, one
    per variant in order, named ``lightning_rlhf …``, each with tokens/s = sampled tokens / timed seconds; both
    variants sampled the same number of tokens (same model, prompts and seed: the same samples)."""
    out = tmp_path / "results" / "generate.json"
    steps = 2
    printed = run_python(
        str(REPO / "scripts" / "benchmark.py"),
        "generate",
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "24",
        "--warmup",
        "1",
        "--steps",
        str(steps),
        "--variants",
        "dynamic",
        "static",
        "--json",
        str(out),
        cwd=tmp_path,
    ).stdout
    rows = json.loads(out.read_text())
    assert rows == json.loads(printed[printed.index("{\n") : printed.rindex("}") + 1])["results"]
    assert [row["impl"] for row in rows] == [
        "lightning_rlhf generate, dynamic cache",
        "lightning_rlhf generate, static cache",
    ]
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(row["sampled_tokens"] / (row["step_s"] * steps))
        assert row["peak_mem_mib"] > 0
    assert rows[0]["sampled_tokens"] == rows[1]["sampled_tokens"] > 0
    assert not list(out.parent.glob(".*tmp*"))  # written atomically: no staging file left behind


@pytest.mark.slow
def test_generate_shared_prompt_benchmark_samples_g_rows_per_prompt_prefilled_each_then_once(tmp_path):
    """``generate --shared-prompt --num-generations 4 --batch-size 8``: two rows, each row prefilled then each prompt
    prefilled once, named so, sampling the same tokens (same model, prompts and seed; the prefill is shared, not the
    distribution). Catches a row given other prompts, repeats or draws than the other's (its sampled tokens) and
    the rows swapped or misnamed; that the shared row shares is ``test_rollout``'s (the forwards' shapes)."""
    out = tmp_path / "generate.json"
    run_python(
        str(REPO / "scripts" / "benchmark.py"),
        "generate",
        "--shared-prompt",
        "--num-generations",
        "4",
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--batch-size",
        "8",
        "--max-new-tokens",
        "12",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    rows = json.loads(out.read_text())
    assert [row["impl"] for row in rows] == [
        "lightning_rlhf generate, dynamic cache, each of a prompt's 4 rows prefilled",
        "lightning_rlhf generate, dynamic cache, a prompt prefilled once for 4 rows",
    ]
    assert rows[0]["sampled_tokens"] == rows[1]["sampled_tokens"] > 0


def test_gpu_check_reports_the_rows_a_benchmark_wrote_and_never_a_previous_runs(tmp_path, monkeypatch):
    """A benchmark that fails leaves no rows in the report even where an earlier run left its JSON file; one that
    succeeds reports exactly the rows it wrote to the path given after ``--json``."""
    from scripts import gpu_check

    results = tmp_path / "benchmarks"
    results.mkdir()
    (results / "dpo_0.5B_LoRA.json").write_text('[{"impl": "stale"}]')
    rows = [{"impl": "lightning_rlhf", "tokens_per_s": 2.0, "peak_mem_mib": 3.0}]

    def fake_run(name, command, timeout, writes):
        if writes:
            (tmp_path / command[command.index("--json") + 1]).write_text(json.dumps(rows))
        return {"name": name, "command": command, "returncode": 0 if writes else 1, "seconds": 0.0, "output": ""}

    monkeypatch.setattr(gpu_check, "run", lambda *a: fake_run(*a, writes=False))
    assert gpu_check.run_benchmark("dpo 0.5B, LoRA", ["dpo"], results, "2", 60)["results"] == []
    monkeypatch.setattr(gpu_check, "run", lambda *a: fake_run(*a, writes=True))
    assert gpu_check.run_benchmark("dpo 0.5B, LoRA", ["dpo"], results, "2", 60)["results"] == rows


@pytest.mark.slow
def test_shared_prompt_benchmark_trains_both_layouts_on_the_same_batches(tmp_path):
    """``rm --shared-prompt``: a padded row then a ``shared`` one, credited the same tokens (the same batches), with
    the same loss at every step (the layouts are exact)."""
    out = tmp_path / "rm.json"
    steps = 2
    run_python(
        str(REPO / "scripts" / "benchmark.py"),
        "rm",
        "--shared-prompt",
        "--num-generations",
        "3",
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--warmup",
        "1",
        "--steps",
        str(steps),
        "--json",
        str(out),
        cwd=tmp_path,
    )
    padded, shared = json.loads(out.read_text())
    assert (padded["impl"], shared["impl"]) == ("lightning_rlhf padded", "lightning_rlhf shared")
    tokens = [row["tokens_per_s"] * row["step_s"] * steps for row in (padded, shared)]
    assert tokens[0] == pytest.approx(tokens[1])
    assert len(padded["losses"]) == len(shared["losses"]) == steps + 1
    assert padded["losses"] == pytest.approx(shared["losses"], abs=1e-5)


@pytest.mark.slow
def test_kto_benchmark_row_trains_kto_on_the_pairs_and_is_credited_their_tokens(tmp_path):
    """``dpo --kto``: our DPO row, then a KTO row named so, both with a peak memory, credited the same tokens (the
    pairs' chosen and rejected completions; KTO's mismatched rows, forwarded only for its reference point, are not
    credited). Catches the KTO row left out of the run or measured as DPO (its name), or credited other work than the
    DPO row."""
    out = tmp_path / "dpo.json"
    steps = 2
    run_python(
        str(REPO / "scripts" / "benchmark.py"),
        "dpo",
        "--kto",
        *("--hidden-size", "32", "--layers", "1", "--batch-size", "4", "--max-length", "32"),
        *("--warmup", "1", "--steps", str(steps), "--json", str(out)),
        cwd=tmp_path,
    )
    rows = json.loads(out.read_text())
    assert [row["impl"] for row in rows][:2] == ["lightning_rlhf", "lightning_rlhf kto (unpaired)"]
    dpo, kto = rows[:2]
    assert dpo["tokens_per_s"] * dpo["step_s"] == pytest.approx(kto["tokens_per_s"] * kto["step_s"])
    assert dpo["peak_mem_mib"] > 0 and kto["peak_mem_mib"] > 0


def test_ppo_plan_names_each_row_by_explicit_flags_padded_then_shared_on_each_engine(monkeypatch):
    """``ppo --estimators gae grpo --engine vllm --shared-prompt``: per estimator, hf padded, hf shared, vllm padded,
    vllm shared (no TRL row beside shared runs), each passed to its process as explicit ``--row`` flags; without
    ``--shared-prompt`` every hf row, then every vllm row, then TRL's GRPOTrainer beside our grpo."""
    from scripts.benchmarks import cli
    from scripts.benchmarks.common import Row

    def rows(*argv: str) -> list[Row]:
        monkeypatch.setattr("sys.argv", ["benchmark.py", *argv])
        args = cli.parser("").parse_args()
        return cli.STAGES[args.stage].plan(args)

    shared = rows("ppo", "--estimators", "gae", "grpo", "--engine", "vllm", "--shared-prompt")
    assert [(r.estimator, r.rollout_engine, r.layout) for r in shared] == [
        (e, n, lay) for e in ("gae", "grpo") for n in ("hf", "vllm") for lay in ("padded", "shared")
    ]
    assert shared[-1].flags() == [
        *("--row", "ours", "--estimator", "grpo", "--rollout-engine", "vllm"),
        *("--layout", "shared", "--cache", "dynamic", "--adapter", "none", "--loss-type", "sigmoid"),
    ]
    free = rows("dpo", "--reference-free")  # DPO with its reference, SimPO and ORPO without, then TRL's DPO
    assert [(r.impl, r.loss_type) for r in free] == [
        ("ours", "sigmoid"),
        ("ours", "simpo"),
        ("ours", "orpo"),
        ("trl", "sigmoid"),
    ]
    assert free[1].flags()[-2:] == ["--loss-type", "simpo"]
    kto = rows("dpo", "--kto")  # DPO, then KTO on the same pairs read as unpaired records, then TRL's DPO
    assert [(r.impl, r.loss_type) for r in kto] == [("ours", "sigmoid"), ("ours", "kto"), ("trl", "sigmoid")]
    padded = rows("ppo", "--estimators", "gae", "grpo", "--engine", "vllm")
    assert [(r.impl, r.estimator, r.rollout_engine) for r in padded] == [
        ("ours", "gae", "hf"),
        ("ours", "grpo", "hf"),
        ("ours", "gae", "vllm"),
        ("ours", "grpo", "vllm"),
        ("trl", "gae", "hf"),
    ]
