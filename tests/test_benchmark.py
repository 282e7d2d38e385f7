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
        str(REPO / "scripts" / "benchmark.py"), "generate", "--hidden-size", "32", "--layers", "1", "--batch-size", "2",
        "--max-new-tokens", "24", "--warmup", "1", "--steps", str(steps), "--variants", "dynamic", "static",
        "--json", str(out), cwd=tmp_path,
    ).stdout  # fmt: skip
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
