"""Win rates and ratings from a judge's scores: pure functions of score tensors.

From the ``(m, p)`` score matrix of ``m`` models on ``p`` prompts come the pairwise win rates (a tie counts half),
each model's win rate against a baseline (InstructGPT's headline number, Ouyang et al. 2022, figure 1), and
Bradley–Terry strengths fitted to all pairs at once (Hunter 2004), reported on the Elo scale as in Chatbot Arena
(Chiang et al. 2024). Confidence intervals come from resampling prompts (a percentile bootstrap). Best-of-n
(``best_of_n``, with its analytic KL) is the over-optimisation baseline (Gao et al. 2022).

Shapes: ``m`` models, ``p`` prompts, ``N`` samples per prompt, ``R`` bootstrap resamples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

ELO_SCALE = 400 / math.log(10)  # Elo points per nat of log-strength: 400 points = 10:1 odds


def pairwise_outcomes(scores: Tensor) -> Tensor:
    """``(m, m, p)``: 1 where model i's response to prompt j scores above model k's, 0.5 on a tie, else 0."""
    diff = scores[:, None, :] - scores[None, :, :]
    return (diff > 0).double() + 0.5 * (diff == 0).double()


def win_rate_matrix(scores: Tensor) -> Tensor:
    """Pairwise win rates over prompts, a tie counting half.

    Args:
        scores: ``(m, p)`` judge score of model i's response to prompt j.

    Returns:
        ``(m, m)`` float64; entry ``[i, k]`` is the fraction of prompts on which model i beats model k. The
        diagonal is 0.5 and ``W + Wᵀ = 1``.
    """
    return pairwise_outcomes(torch.as_tensor(scores, dtype=torch.float64)).mean(-1)


def _strongly_connected(wins: Tensor) -> Tensor:
    """``(...)`` bool: every model reaches every other along "beat at least once" edges (Hunter 2004, assumption
    1: without it the likelihood has no finite maximum)."""
    m = wins.shape[-1]
    reach = (wins > 0) | torch.eye(m, dtype=torch.bool)
    for _ in range(max(1, math.ceil(math.log2(m)))):  # path lengths double each squaring
        reach = (reach.double() @ reach.double()) > 0
    return reach.flatten(-2).all(-1)


def bradley_terry(wins: Tensor, prior: float = 0.5, iters: int = 10_000, tol: float = 1e-10) -> Tensor:
    """Bradley–Terry log-strengths by the MM algorithm of Hunter (2004), "MM algorithms for generalized
    Bradley–Terry models", eq. (3): ``p_i ← W_i / Σ_{k≠i} n_ik / (p_i + p_k)``.

    Under the model P(i beats k) = p_i / (p_i + p_k) = σ(θ_i − θ_k) with θ = log p.

    Args:
        wins: ``(..., m, m)`` win counts, ``[i, k]`` = times i beat k (ties already split as half a win each);
            the diagonal is ignored. Leading dimensions are independent problems fitted together.
        prior: virtual wins added to both ``[i, k]`` and ``[k, i]`` of every pair, i.e. ``2·prior`` virtual tied
            games (the default is one). It keeps the strengths finite when a model never wins or never loses,
            and shrinks them a little towards equality. With ``prior=0`` the plain maximum-likelihood estimate,
            which exists only when the win graph is strongly connected (otherwise a ValueError).
        iters: most MM iterations.
        tol: stop once no log-strength moves by more than this.

    Returns:
        ``(..., m)`` float64 log-strengths θ with mean 0 (strengths of geometric mean 1).
    """
    wins = torch.as_tensor(wins, dtype=torch.float64)
    m = wins.shape[-1]
    if m < 2 or wins.shape[-2] != m or (wins < 0).any() or prior < 0:
        raise ValueError(f"wins must be (..., m, m) non-negative counts, m >= 2, prior >= 0; got {tuple(wins.shape)}")
    off_diagonal = 1 - torch.eye(m, dtype=torch.float64)
    wins = (wins + prior) * off_diagonal
    if prior == 0 and not _strongly_connected(wins).all():
        raise ValueError("a model never wins or never loses, so its strength is infinite; use prior > 0")
    games = wins + wins.transpose(-1, -2)  # n_ik
    total_wins = wins.sum(-1)  # W_i
    theta = torch.zeros(wins.shape[:-1], dtype=torch.float64)
    for _ in range(iters):
        strength = theta.exp()
        denominator = (games / (strength[..., :, None] + strength[..., None, :])).sum(-1)
        updated = (total_wins / denominator).log()
        updated = updated - updated.mean(-1, keepdim=True)
        converged = (updated - theta).abs().max() <= tol
        theta = updated
        if converged:
            break
    return theta


def elo_ratings(theta: Tensor, baseline_index: int = 0, base: float = 1000.0) -> Tensor:
    """``(..., m)`` Elo-scale ratings ``base + 400 / ln 10 · (θ_i − θ_baseline)``: the baseline gets ``base``, and
    400 points more means 10:1 odds of winning."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    return base + ELO_SCALE * (theta - theta[..., baseline_index : baseline_index + 1])


class RatingIntervals(NamedTuple):
    """Percentile bootstrap intervals, each ``(m, 2)`` rows of (low, high)."""

    elo: Tensor
    win_rate_vs_baseline: Tensor


def bootstrap_ratings(
    scores: Tensor,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    baseline_index: int = 0,
    prior: float = 0.5,
) -> RatingIntervals:
    """Confidence intervals for Elo ratings and win rates vs the baseline, by resampling prompts with replacement
    (Efron & Tibshirani 1993, percentile intervals; the Chatbot Arena recipe, Chiang et al. 2024).

    Args:
        scores: ``(m, p)`` judge score of model i's response to prompt j.
        n_resamples: bootstrap resamples ``R``.
        seed: seeds a private ``torch.Generator``: same seed, same intervals.
        confidence: central probability mass of each interval.
        baseline_index: the model at Elo ``1000`` whose win rates are reported.
        prior: as in ``bradley_terry``.
    """
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and n_resamples >= 1, got {confidence}, {n_resamples}")
    outcomes = pairwise_outcomes(torch.as_tensor(scores, dtype=torch.float64))  # (m, m, p)
    p = outcomes.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(p, (n_resamples, p), generator=generator)
    # How often each prompt was drawn: a resample's win counts are the outcomes weighted by it.
    counts = torch.zeros(n_resamples, p, dtype=torch.float64).scatter_add_(1, drawn, torch.ones_like(drawn).double())
    wins = torch.einsum("ikp,rp->rik", outcomes, counts)  # (R, m, m)
    elo = elo_ratings(bradley_terry(wins, prior), baseline_index)  # (R, m)
    win_rate = wins[:, :, baseline_index] / p  # (R, m)
    quantiles = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    return RatingIntervals(torch.quantile(elo, quantiles, dim=0).T, torch.quantile(win_rate, quantiles, dim=0).T)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ base policy) = ``log n − (n − 1) / n`` nats (Stiennon et al. 2020, appendix G.3; Gao et al.
    2022, "Scaling laws for reward model overoptimization", section 2): the x-axis of over-optimisation plots."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(selector_scores: Tensor, judge_scores: Tensor) -> Tensor:
    """Mean judge score of the sample a selector picks among the first n of each prompt, for n = 1..N.

    Args:
        selector_scores: ``(p, N)`` scores of N samples per prompt by the selector (e.g. the reward model).
        judge_scores: ``(p, N)`` scores of the same samples by the judge (e.g. the gold judge).

    Returns:
        ``(N,)`` float64; entry ``n − 1`` is for best-of-n. A tie in the selector goes to the earlier sample.
    """
    selector_scores = torch.as_tensor(selector_scores, dtype=torch.float64)
    judge_scores = torch.as_tensor(judge_scores, dtype=torch.float64)
    if selector_scores.shape != judge_scores.shape or selector_scores.dim() != 2:
        raise ValueError(f"need two (p, N) score matrices, got {selector_scores.shape} and {judge_scores.shape}")
    means = []
    for n in range(1, selector_scores.shape[1] + 1):
        picked = selector_scores[:, :n].argmax(1, keepdim=True)  # (p, 1)
        means.append(judge_scores.gather(1, picked).mean())
    return torch.stack(means)


def rating_report(
    names: Sequence[str],
    scores: Tensor | Sequence[Sequence[float]],
    baseline: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Everything ``evaluate`` reports, from an ``(m, p)`` score matrix, as JSON-able Python values.

    Args:
        names: the ``m`` model names, in the rows' order.
        scores: ``(m, p)`` judge score of model i's response to prompt j.
        baseline: the name whose Elo is 1000 and that win rates are against (default: the first).
        bootstrap: resamples for the confidence intervals; 0 leaves the ``*_ci`` entries ``None``.
        seed: seeds the bootstrap.
        confidence: of the intervals.

    Returns:
        ``models``, ``baseline``, ``prompts`` (p), ``win_rate_matrix`` (m × m lists), and per model name:
        ``mean_score``, ``win_rate_vs_baseline``, ``elo``, and ``win_rate_vs_baseline_ci`` / ``elo_ci`` as
        ``[low, high]``; also ``confidence`` and ``bootstrap``.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    names = list(names)
    baseline = names[0] if baseline is None else baseline
    if scores.dim() != 2 or scores.shape[0] != len(names) or scores.shape[1] == 0 or len(names) < 2:
        raise ValueError(f"scores must be (m, p) with m = {len(names)} names (at least 2), got {tuple(scores.shape)}")
    if len(set(names)) != len(names) or baseline not in names:
        raise ValueError(f"names must be distinct and include the baseline {baseline!r}; got {names}")
    b = names.index(baseline)
    wins = pairwise_outcomes(scores).sum(-1)  # (m, m) counts, ties as half a win each
    win_rates = wins / scores.shape[1]
    elo = elo_ratings(bradley_terry(wins), b)
    if bootstrap:
        intervals = bootstrap_ratings(scores, bootstrap, seed, confidence, b)
        elo_ci, win_rate_ci = intervals.elo.tolist(), intervals.win_rate_vs_baseline.tolist()
    else:
        elo_ci = win_rate_ci = [None] * len(names)
    return {
        "models": names,
        "baseline": baseline,
        "prompts": scores.shape[1],
        "win_rate_matrix": win_rates.tolist(),
        "mean_score": dict(zip(names, scores.mean(1).tolist(), strict=True)),
        "win_rate_vs_baseline": dict(zip(names, win_rates[:, b].tolist(), strict=True)),
        "win_rate_vs_baseline_ci": dict(zip(names, win_rate_ci, strict=True)),
        "elo": dict(zip(names, elo.tolist(), strict=True)),
        "elo_ci": dict(zip(names, elo_ci, strict=True)),
        "confidence": confidence,
        "bootstrap": bootstrap,
    }


def plot_win_rates(report: dict[str, Any]) -> Figure:
    """InstructGPT figure 1 form: the annotated win-rate matrix, and each model's win rate vs the baseline with
    its bootstrap interval."""
    names, win_rates = report["models"], report["win_rate_matrix"]
    figure = Figure(figsize=(4 + 1.6 * len(names), 0.6 * len(names) + 3))
    FigureCanvasAgg(figure)
    matrix_axes, bar_axes = figure.subplots(1, 2)
    image = matrix_axes.imshow(win_rates, cmap="RdBu", vmin=0, vmax=1)
    for i, row in enumerate(win_rates):
        for k, rate in enumerate(row):
            color = "white" if abs(rate - 0.5) > 0.3 else "black"  # readable on the dark ends of the colour map
            matrix_axes.text(k, i, f"{rate:.2f}", ha="center", va="center", color=color)
    matrix_axes.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="against", ylabel="model")
    matrix_axes.set_xticklabels(names, rotation=45, ha="right")
    matrix_axes.set_yticklabels(names)
    matrix_axes.set_title(f"P(row beats column), {report['prompts']} prompts")
    figure.colorbar(image, ax=matrix_axes, fraction=0.046)

    rates = [report["win_rate_vs_baseline"][name] for name in names]
    intervals = [report["win_rate_vs_baseline_ci"][name] for name in names]
    errors = None
    if all(interval is not None for interval in intervals):  # a percentile interval can miss the point estimate
        errors = [
            [max(rate - low, 0) for rate, (low, _) in zip(rates, intervals, strict=True)],
            [max(high - rate, 0) for rate, (_, high) in zip(rates, intervals, strict=True)],
        ]
    bar_axes.bar(range(len(names)), rates, yerr=errors, capsize=4, color="tab:blue")
    bar_axes.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    bar_axes.set(xticks=range(len(names)), ylim=(0, 1), ylabel=f"win rate vs {report['baseline']}")
    bar_axes.set_xticklabels(names, rotation=45, ha="right")
    bar_axes.set_title(f"vs {report['baseline']} ({report['confidence']:.0%} bootstrap CI)")
    figure.tight_layout()
    return figure


def format_table(report: dict[str, Any]) -> str:
    """One row per model: mean judge score, win rate vs the baseline [CI], Elo [CI]."""

    def interval(values: list[float] | None, spec: str) -> str:
        return "" if values is None else f" [{values[0]:{spec}}, {values[1]:{spec}}]"

    width = max(len("model"), *(len(name) for name in report["models"]))
    lines = [f"{'model':<{width}}  {'mean score':>10}  {'win rate vs ' + report['baseline']:<28}  Elo"]
    for name in report["models"]:
        rate = report["win_rate_vs_baseline"][name]
        win_rate = f"{rate:.3f}{interval(report['win_rate_vs_baseline_ci'][name], '.3f')}"
        elo = f"{report['elo'][name]:.0f}{interval(report['elo_ci'][name], '.0f')}"
        lines.append(f"{name:<{width}}  {report['mean_score'][name]:>10.4f}  {win_rate:<28}  {elo}")
    return "\n".join(lines)


def rank(scores: list[float]) -> list[int]:
    """Dense ranks, 0 for the highest score; equal scores share a rank."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]
