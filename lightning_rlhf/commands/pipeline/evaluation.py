"""The pipeline's evaluation on held-out prompts (``lightning-rlhf pipeline``): every policy scored by the judge,
or by the reward model when there is no judge; the reward model's agreement with the judge; best-of-n; training
curves read back from TensorBoard; the over-optimisation plot."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_rlhf.commands.sample import judge_records
from lightning_rlhf.data.records import read_records
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.evaluation.judges import make_scorer, reward_model_scorer
from lightning_rlhf.evaluation.ratings import best_of_n, best_of_n_kl
from lightning_rlhf.io import save_figure_atomic
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.rl.sampling import gold_scores, judge_samples, sample_and_judge, sample_responses


def model_scores(
    model_dir: Path, prompts: list[str], temperature: float, judge=None, second_skill: list[str] | None = None
) -> dict:
    """Judge score (the toy's gold judge unless ``judge``), greedy and sampled, of one response per prompt; the sampled
    scores per prompt are kept (under ``per_prompt``) for the win rates. Every model is sampled under the same seed.
    With ``second_skill`` (the toy's prompts of its second skill, which RL never trains on), also the judge's greedy
    score on them: what RL costs the skills it does not train (the alignment tax)."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tokenizer).eval()
    torch.manual_seed(0)
    name = model_dir.parent.name  # outputs/<stage>/hf
    judged = {"judge": judge} if judge else {}
    greedy = gold_scores(model, tokenizer, prompts, temperature=0.0, progress=True, desc=f"{name} greedy", **judged)
    sampled = gold_scores(
        model, tokenizer, prompts, temperature=temperature, progress=True, desc=f"{name} sampled", **judged
    )
    scores = {"gold_greedy": statistics.mean(greedy), "gold_sampled": statistics.mean(sampled)}
    if second_skill:
        desc = f"{name} second skill"
        other = gold_scores(model, tokenizer, second_skill, temperature=0.0, progress=True, desc=desc, **judged)
        scores["second_skill"] = statistics.mean(other)
    return scores | {"per_prompt": sampled}


def demonstrations_score(path: str, judge: Callable[[str, str], float], most: int = 1000) -> dict:
    """The judge's mean score of the demonstrations SFT imitates (a seeded draw of ``most`` when there are more): about
    what an SFT model that has learnt them reaches on held-out prompts (the diagnosis compares the two)."""
    records, _ = read_records(path, "demonstration")
    fields = [record.fields for record in records]
    drawn = random.Random(0).sample(fields, most) if len(fields) > most else fields
    scores = [judge(record["prompt"], record["response"]) for record in drawn]
    return {"gold_mean": statistics.mean(scores), "records": len(drawn)}


def reward_model_scores(model_dir: Path, prompts: list, temperature: float, reward_model) -> dict:
    """With no judge: the reward model's score (``reward_model``, a scorer of batches), greedy and sampled, of one
    response per prompt, sampled as ``model_scores`` samples; the sampled scores per prompt under ``per_prompt``."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tokenizer).eval()
    torch.manual_seed(0)
    name = model_dir.parent.name  # outputs/<stage>/hf
    scores = {}
    for mode, temperature_ in (("greedy", 0.0), ("sampled", temperature)):
        _, judged = sample_and_judge(
            model,
            tokenizer,
            prompts,
            reward_model,
            1,
            512,
            128,
            True,
            f"{name} {mode}",
            max_new_tokens=16,
            temperature=temperature_,
        )
        scores[mode] = [prompt_scores[0] for prompt_scores in judged]
    return {
        "rm_greedy": statistics.mean(scores["greedy"]),
        "rm_sampled": statistics.mean(scores["sampled"]),
        "per_prompt": scores["sampled"],
    }


def rm_validation_accuracy(run_dir: Path) -> dict[str, float]:
    """A reward model's pairwise accuracy on its validation split of the comparisons it trained on, at its last
    validation (from its TensorBoard events): with people's rankings and no judge, the agreement that can be had."""
    accuracy = latest_events(run_dir).Scalars("val/accuracy")
    return {"val_accuracy_on_comparisons": accuracy[-1].value}


def rm_scores(rm_dir: Path, prompts: list[str], samples: list[list[str]]) -> list[list[float]]:
    """The reward model's score of each sample, ``samples[i][j]`` answering ``prompts[i]``."""
    return judge_samples(prompts, samples, reward_model_scorer(str(rm_dir), batch_size=256, progress=True))


def sft_samples(sft_dir: Path, prompts: list[str], k: int, temperature: float, seed: int) -> list[list[str]]:
    tokenizer = load_tokenizer(str(sft_dir))
    policy = load_causal_lm(str(sft_dir), tokenizer).eval()
    torch.manual_seed(seed)
    return sample_responses(
        policy,
        tokenizer,
        prompts,
        k,
        512,
        256,
        True,
        f"sft samples (k={k})",
        max_new_tokens=16,
        temperature=temperature,
    )


def reward_accuracy(rm_dir: Path, prompts: list[str], samples: list[list[str]], judge) -> dict[str, float]:
    """Pairwise accuracy of the reward model against the judge over every pair of distinct samples of a prompt that
    the judge does not tie."""
    comparisons, _ = judge_records(prompts, samples, make_scorer(judge), noise=0.0, seed=0)
    rewards = rm_scores(rm_dir, [c["prompt"] for c in comparisons], [c["responses"] for c in comparisons])
    correct = total = 0
    for comparison, scores in zip(comparisons, rewards, strict=True):
        ranks = comparison["ranks"]
        for i in range(len(ranks)):
            for j in range(len(ranks)):
                if ranks[i] < ranks[j]:
                    total += 1
                    correct += scores[i] > scores[j]
    return {"rm_pairwise_accuracy_vs_gold": correct / max(total, 1), "rm_eval_pairs": total}


def best_of_n_curve(rm_dir: Path, prompts: list[str], samples: list[list[str]], judge) -> dict[str, list[float]]:
    """The judge's score of the reward model's pick among the first n samples, n = 1 … N, and its analytic KL."""
    gold = [[judge(p, r) for r in rs] for p, rs in zip(prompts, samples, strict=True)]
    curve = best_of_n(torch.tensor(rm_scores(rm_dir, prompts, samples)), torch.tensor(gold))
    n = list(range(1, len(samples[0]) + 1))
    return {"n": n, "kl": [best_of_n_kl(i) for i in n], "gold": curve.tolist()}


def latest_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(max((run_dir / "tensorboard").glob("version_*"), key=lambda p: p.stat().st_mtime)))
    events.Reload()
    return events


def ppo_curve(run_dir: Path) -> dict[str, list[float]]:
    """An RL run's validation curves from its TensorBoard events: KL, reward-model score and judge score (when it had a
    judge); and the
    share of empty responses in its training rollouts (``empty_fraction``) when it was logged."""
    events = latest_events(run_dir)
    logged = events.Tags()["scalars"]  # ``judge`` only when the run had a judge_fn
    series = {
        name: events.Scalars(f"val/objective/{name}")
        for name in ("kl", "scores", "judge")
        if f"val/objective/{name}" in logged
    }
    curve = {"step": [e.step for e in series["kl"]], **{name: [e.value for e in s] for name, s in series.items()}}
    if "train/empty_fraction" in events.Tags()["scalars"]:
        curve["empty_fraction"] = [e.value for e in events.Scalars("train/empty_fraction")]
    return curve


def sft_curve(run_dir: Path) -> dict[str, list[float]]:
    """SFT's validation loss at each check, from its TensorBoard events."""
    loss = latest_events(run_dir).Scalars("val/loss")
    return {"step": [e.step for e in loss], "val_loss": [e.value for e in loss]}


def plot_overoptimization(summary: dict, path: Path) -> Path:
    """Gold score (dots) and reward-model score (crosses, right axis) against KL to the SFT model: PPO runs and
    best-of-n with the reward model (Gao et al. 2022, figure 1)."""
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    gold_axes = figure.subplots()
    rm_axes = gold_axes.twinx()
    bon = summary["best_of_n"]
    gold_axes.plot(bon["kl"], bon["gold"], "o-", color="tab:green", label="best-of-n (n = 1 … 16), gold")
    gold_axes.plot([0], [summary["sft"]["gold_sampled"]], "k*", markersize=10, label="SFT, gold")
    for name, color in (("ppo", "tab:blue"), ("ppo_overoptimized", "tab:red")):
        curve = summary.get("curves", {}).get(name)
        if curve:
            # Validation points in training order (the KL need not grow monotonically), so dotted.
            gold_axes.plot(curve["kl"], curve["judge"], "o:", color=color, label=f"{name}, gold (validation)")
            rm_axes.plot(curve["kl"], curve["scores"], "x:", color=color, alpha=0.5, label=f"{name}, reward model")
    gold_axes.set(xlabel="KL(π ‖ π_SFT), nats per response", ylabel="gold score (sampled, T = 1)")
    rm_axes.set_ylabel("reward-model score (x)")
    gold_axes.set_title("Reward over-optimisation: the proxy rises, the gold score need not")
    lines = gold_axes.get_legend_handles_labels()
    more = rm_axes.get_legend_handles_labels()
    gold_axes.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower right")
    figure.tight_layout()
    return save_figure_atomic(figure, path)


def plot_alignment_tax(summary: dict, path: Path) -> Path:
    """The second skill's greedy score (the toy's naming of a word's last letter, which RL never trains
    on) against each RL policy's KL to SFT
    at its last validation, SFT at KL 0: how much of a skill RL spends for its KL, and what PPO-ptx keeps
    (InstructGPT's alignment tax)."""
    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.axhline(summary["sft"]["second_skill"], color="k", linestyle=":", linewidth=1)
    axes.plot([0], [summary["sft"]["second_skill"]], "k*", markersize=10, label="sft")
    for name, curve in summary.get("curves", {}).items():
        if curve.get("kl") and "second_skill" in summary.get(name, {}):
            axes.plot([curve["kl"][-1]], [summary[name]["second_skill"]], "o", label=name)
    axes.set(
        xlabel="KL(π ‖ π_SFT) at the last validation, nats per response", ylabel="second skill (last letter), greedy"
    )
    axes.set_title("The alignment tax: what RL on reversal costs the second skill")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return save_figure_atomic(figure, path)
