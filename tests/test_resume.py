"""Long commands write results as they go and continue after an interruption: ``sample`` and ``score`` append each
finished batch to ``OUTPUT.partial`` and a rerun with the same arguments skips what is done (``data.resumable``)."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from lightning_rlhf.cli import main
from lightning_rlhf.commands import sample, score
from lightning_rlhf.data import resumable
from lightning_rlhf.data.resumable import ResumableJsonl
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.evaluation import judges
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.models.reward import load_reward_model
from lightning_rlhf.rl import engines
from lightning_rlhf.toy import gold_score
from tests.helpers import REPO

PROMPTS = [f"Reverse: {word}\n" for word in ("ab", "cde", "fg", "hijk", "lm", "nop", "qr")]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def partial_files(output):
    return output.with_name(output.name + ".partial"), output.with_name(output.name + ".partial.json")


class Interrupted(BaseException):
    """Stands for Ctrl-C: like KeyboardInterrupt no ``except Exception`` catches it, but one that escapes a test
    fails that test instead of stopping pytest."""


def interrupt_at_call(monkeypatch, module, name: str, call: int) -> list:
    """Replace ``module.name`` by a wrapper that counts its calls (returned) and raises ``Interrupted`` on call
    number ``call`` (never when 0)."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def sample_args(model_dir, prompts, output, *extra, judge: str = "gold") -> list[str]:
    """7 prompts, k = 3, batches of 6 responses = 2 prompts: batches start at prompts 0, 2, 4 and 6. The labeller's
    noise orders an untrained model's samples (one of 3! orders each), so its seed matters as much as the
    sampling's."""
    return [
        "--model",
        model_dir,
        "--prompts",
        prompts,
        "--k",
        "3",
        "--batch_size",
        "6",
        "--max_new_tokens",
        "4",
        "--judge",
        judge,
        "--noise",
        "0.5",
        "--output",
        str(output),
        *extra,
    ]


def test_interrupted_sample_keeps_its_batches_and_the_rerun_writes_what_one_run_writes(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Interrupted in its third generation (prompts 4-5): the records of prompts 0-3 are in ``OUTPUT.partial``,
    exactly the first lines an uninterrupted run writes; the output a previous run left is untouched. The rerun with
    the same arguments generates only the last two batches and ends with the uninterrupted run's file, byte for
    byte, and its report (the counters of the first run's batches carried over); no partial files remain."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    straight = sample.main(sample_args(tiny_model_dir, prompts, tmp_path / "straight.jsonl"))
    expected = (tmp_path / "straight.jsonl").read_text()
    assert straight.written >= 5  # enough ranked prompts that a shifted noise or sampling seed shows

    output = tmp_path / "comparisons.jsonl"
    output.write_text("a previous run's results\n")
    calls = interrupt_at_call(monkeypatch, engines, "generate", 3)
    with pytest.raises(Interrupted):
        sample.main(sample_args(tiny_model_dir, prompts, output))
    records, state = partial_files(output)
    kept = records.read_text().splitlines(keepends=True)
    assert [json.loads(line)["prompt"] for line in kept] == [p for p in PROMPTS[:4] if json.dumps(p) in expected]
    assert "".join(kept) == "".join(expected.splitlines(keepends=True)[: len(kept)])
    assert json.loads(state.read_text())["done"] == 4
    assert output.read_text() == "a previous run's results\n"

    calls.clear()
    resumed = sample.main(sample_args(tiny_model_dir, prompts, output))
    assert len(calls) == 2
    assert output.read_text() == expected
    assert resumed == straight
    assert not records.exists() and not state.exists()


def test_a_partial_sample_made_with_other_settings_is_refused_by_name(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """After an interruption, a rerun with another --temperature, or with one prompt of the input changed, stops
    with one line naming the partial file and what differs, and leaves the partial files as they were; with
    --restart it discards them and samples all four batches."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    output = tmp_path / "comparisons.jsonl"
    interrupt_at_call(monkeypatch, engines, "generate", 2)
    with pytest.raises(Interrupted):
        sample.main(sample_args(tiny_model_dir, prompts, output))
    records, state = partial_files(output)
    kept = records.read_bytes(), state.read_bytes()

    with pytest.raises(SystemExit, match="1"):
        main(["sample", *sample_args(tiny_model_dir, prompts, output, "--temperature", "0.5")])
    err = capsys.readouterr().err
    assert f"{records} holds the first 2 results of a run with other settings (temperature: 1.0 then, 0.5 now)" in err
    changed = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in [*PROMPTS[:6], "Reverse: xy\n"]])
    with pytest.raises(ValueError, match=r"other settings \(prompts: '[0-9a-f]{16}' then, '[0-9a-f]{16}' now\)"):
        sample.main(sample_args(tiny_model_dir, changed, output))
    assert (records.read_bytes(), state.read_bytes()) == kept and not output.exists()
    calls = interrupt_at_call(monkeypatch, engines, "generate", 0)
    sample.main(sample_args(tiny_model_dir, changed, output, "--restart"))
    assert len(calls) == 4 and output.exists() and not records.exists() and not state.exists()


def test_a_sample_stopped_after_its_last_batch_finishes_on_the_rerun_without_sampling(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Interrupted between its last batch and the rename: all 7 prompts are done, so the rerun only renames."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    output = tmp_path / "comparisons.jsonl"

    def interrupted_finish(self):
        raise Interrupted

    monkeypatch.setattr(ResumableJsonl, "finish", interrupted_finish)
    with pytest.raises(Interrupted):
        sample.main(sample_args(tiny_model_dir, prompts, output))
    monkeypatch.undo()
    kept = partial_files(output)[0].read_text()
    calls = interrupt_at_call(monkeypatch, engines, "generate", 0)
    report = sample.main(sample_args(tiny_model_dir, prompts, output))
    assert calls == [] and output.read_text() == kept and report.prompts == len(PROMPTS)


def kill_at_prompt_4(prompt: str, response: str) -> float:
    """The gold judge, except that with ``KILL_AT_PROMPT_4`` set the process kills itself (SIGKILL, no clean-up)
    when asked about the fifth prompt: a crash in the third batch."""
    if os.environ.get("KILL_AT_PROMPT_4") and prompt == PROMPTS[4]:
        os.kill(os.getpid(), signal.SIGKILL)
    return gold_score(prompt, response)


@pytest.mark.slow
def test_sample_killed_with_sigkill_continues_from_its_last_commit(tiny_model_dir, tmp_path):
    """A subprocess committing after every batch is killed (-9) while judging the third batch: the rerun continues
    from the two committed batches (prompts 4 on: two generations) and writes what an uninterrupted run writes."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    judge = f"{__name__}.kill_at_prompt_4"
    sample.main(sample_args(tiny_model_dir, prompts, tmp_path / "straight.jsonl", judge=judge))
    output = tmp_path / "killed.jsonl"
    args = sample_args(tiny_model_dir, prompts, output, judge=judge)
    code = (
        "from lightning_rlhf.data import resumable; resumable.COMMIT_SECONDS = 0; from lightning_rlhf.cli import main"
    )
    killed = subprocess.run(
        [sys.executable, "-c", f"{code}; main()", "sample", *args],
        cwd=REPO,
        env={**os.environ, "KILL_AT_PROMPT_4": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads(partial_files(output)[1].read_text())["done"] == 4 and not output.exists()

    generated = []
    real = engines.generate  # what the hf engine samples with
    engines.generate = lambda *a, **k: generated.append(1) or real(*a, **k)
    try:
        sample.main(args)
    finally:
        engines.generate = real
    assert len(generated) == 2
    assert output.read_text() == (tmp_path / "straight.jsonl").read_text()


def test_a_rerun_keeps_the_committed_records_and_cuts_off_what_a_crash_left_after_them(tmp_path, monkeypatch):
    """Inputs 0-1 appended and committed; input 2 appended but not committed; then the process dies in the middle
    of writing input 3 (simulated: half a line, the file closed without a commit). The rerun starts at input 2 with
    the committed counters, and the finished output holds 0, 1 and the rerun's 2, nothing of the torn line."""
    output = tmp_path / "out.jsonl"
    monkeypatch.setattr(resumable, "COMMIT_SECONDS", 0.0)
    run = ResumableJsonl(output, {"seed": 1})
    run.append([{"i": 0}, {"i": 1}], done=2, counts={"kept": 2})
    monkeypatch.setattr(resumable, "COMMIT_SECONDS", math.inf)
    run.append([{"i": 2}], done=3, counts={"kept": 3})
    run.file.write(b'{"i": 3, "respo')
    run.file.close()

    rerun = ResumableJsonl(output, {"seed": 1})
    assert (rerun.done, rerun.counts) == (2, {"kept": 2})
    rerun.append([{"i": "2 again"}], done=3)
    assert rerun.finish() == output
    assert output.read_text() == '{"i": 0}\n{"i": 1}\n{"i": "2 again"}\n'
    assert not any(path.exists() for path in partial_files(output))


def test_a_run_that_finishes_nothing_leaves_no_partial_files(tmp_path):
    """Stopped by an error before its first result (e.g. a bad record): nothing to keep, so no partial files that
    would refuse the corrected rerun."""
    output = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), ResumableJsonl(output, {"skip_invalid": False}):
        raise RuntimeError("bad record")
    assert os.listdir(tmp_path) == []


def test_a_second_run_on_the_same_output_is_refused_while_the_first_lasts(tmp_path):
    """Both would append to one partial file: the second stops with one line, and the first writes on unharmed."""
    output = tmp_path / "out.jsonl"
    with ResumableJsonl(output, {"seed": 1}) as first:
        first.append([{"i": 0}], done=1)
        with pytest.raises(OSError, match=r"out\.jsonl\.partial: another run is writing it now"):
            ResumableJsonl(output, {"seed": 1})
        first.append([{"i": 1}], done=2)
        first.finish()
    assert output.read_text() == '{"i": 0}\n{"i": 1}\n'


@pytest.fixture
def reward_model_dir(tiny_model_dir, tmp_path) -> str:
    tokenizer = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    return str(export_pretrained(load_reward_model(tiny_model_dir, tokenizer), tokenizer, tmp_path / "rm"))


def test_interrupted_score_continues_in_input_order_to_what_one_run_writes(
    reward_model_dir, tmp_path, monkeypatch, capsys
):
    """7 records, batches of 2, one batch a chunk: chunks of records 0-1, 2-3, 4-5, 6. Record 1's prompt is over
    --max_length 8 (skipped and counted, in the first chunk, whose one batch is record 0). Interrupted in the third
    batch (records 4-5): the rows of records 0, 2 and 3 are kept;
    the rerun scores only the last two chunks, writes the uninterrupted run's file (input order, not length order)
    and still counts the over-long record of the first run."""
    monkeypatch.setattr(score, "CHUNK_BATCHES", 1)
    rows = [{"prompt": "p", "response": "r" * n} for n in (5, 1, 4, 2, 6, 3, 1)]
    rows[1]["prompt"] = "x" * 20
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ["--model", reward_model_dir, "--input", source, "--batch_size", "2", "--max_length", "8", "--skip_invalid"]
    main(["score", *args, "--output", str(tmp_path / "straight.jsonl")])
    expected = (tmp_path / "straight.jsonl").read_text()
    assert [json.loads(line)["response"] for line in expected.splitlines()] == ["r" * n for n in (5, 4, 2, 6, 3, 1)]
    capsys.readouterr()

    output = tmp_path / "scored.jsonl"
    calls = interrupt_at_call(monkeypatch, judges, "sequence_rewards", 3)
    with pytest.raises(Interrupted):
        main(["score", *args, "--output", str(output)])
    records, state = partial_files(output)
    assert records.read_text() == "".join(expected.splitlines(keepends=True)[:3])  # records 0, 2 and 3
    calls.clear()
    main(["score", *args, "--output", str(output)])
    assert len(calls) == 2
    assert output.read_text() == expected
    assert "1 records with prompts over max_length=8 skipped" in capsys.readouterr().out
    assert not records.exists() and not state.exists()


def test_a_partial_score_made_with_another_model_is_refused(reward_model_dir, tmp_path, monkeypatch):
    """The reward model trained again into the same directory (its weights file rewritten) is another model."""
    monkeypatch.setattr(score, "CHUNK_BATCHES", 1)
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "response": "r" * n} for n in range(1, 6)])
    args = ["--model", reward_model_dir, "--input", source, "--batch_size", "2", "--output", str(tmp_path / "o.jsonl")]
    interrupt_at_call(monkeypatch, judges, "sequence_rewards", 2)
    with pytest.raises(Interrupted):
        score.main(args)
    weights = next(p for p in os.scandir(reward_model_dir) if p.name.endswith(".safetensors"))
    os.utime(weights.path, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"other settings \(model: .*model.safetensors"):
        score.main(args)
