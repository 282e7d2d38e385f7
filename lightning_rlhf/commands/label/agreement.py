"""Inter-labeller agreement and consensus rankings: pure functions of rankings (0 best, ties equal).

For two rankings of the same K responses, every pair of responses (i, j) is one comparison with three outcomes: i
better, j better, or a tie. Two labellers agree on a pair when they chose the same outcome; their *pairwise
agreement* is the fraction of pairs they agree on. This is the figure InstructGPT reports (72.6 % between training
labellers, Ouyang et al. 2022, section 5.1). Kendall's τ-b (Kendall 1945) is the rank correlation that counts ties:
τ = (C − D) / √((n₀ − n₁)(n₀ − n₂)), with C / D the pairs ordered the same / the opposite way, n₀ = C(K, 2) and
n₁ / n₂ the pairs tied by the first / second labeller.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from lightning_rlhf.evaluation.ratings import rank


def _outcome(ranks: Sequence[int], i: int, j: int) -> int:
    """+1 when response i is ranked above j, -1 below, 0 on a tie."""
    return (ranks[i] < ranks[j]) - (ranks[i] > ranks[j])


def pairwise_agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """``(agreed, compared)``: of the C(K, 2) response pairs, those on which rankings ``a`` and ``b`` chose the same
    outcome (i better, j better or tie), and all of them."""
    if len(a) != len(b):
        raise ValueError(f"rankings of different lengths: {list(a)} and {list(b)}")
    pairs = list(combinations(range(len(a)), 2))
    return sum(_outcome(a, i, j) == _outcome(b, i, j) for i, j in pairs), len(pairs)


def kendall_tau(a: Sequence[int], b: Sequence[int]) -> float:
    """Kendall's τ-b between two rankings of the same responses; 1 the same order, -1 reversed. NaN when either
    ranking ties everything (no order to correlate)."""
    if len(a) != len(b):
        raise ValueError(f"rankings of different lengths: {list(a)} and {list(b)}")
    concordant = discordant = tied_a = tied_b = 0
    for i, j in combinations(range(len(a)), 2):
        product = _outcome(a, i, j) * _outcome(b, i, j)
        concordant += product > 0
        discordant += product < 0
        tied_a += _outcome(a, i, j) == 0
        tied_b += _outcome(b, i, j) == 0
    pairs = len(a) * (len(a) - 1) // 2
    denominator = math.sqrt((pairs - tied_a) * (pairs - tied_b))
    return (concordant - discordant) / denominator if denominator else math.nan


def win_counts(rankings: Sequence[Sequence[int]]) -> list[list[float]]:
    """``[i][k]``: how many rankings put response i above k, a tie counting half to each."""
    size = len(rankings[0])
    wins = [[0.0] * size for _ in range(size)]
    for ranks in rankings:
        for i, k in combinations(range(size), 2):
            outcome = _outcome(ranks, i, k)
            wins[i][k] += (outcome + 1) / 2
            wins[k][i] += (1 - outcome) / 2
    return wins


def borda(rankings: Sequence[Sequence[int]]) -> list[int]:
    """Consensus ranking by Borda count: a response scores one point for each response a labeller ranked below it
    and half a point for each tied with it; ranks are dense by score, equal scores tie."""
    return rank([sum(row) for row in win_counts(rankings)])


def bradley_terry_consensus(rankings: Sequence[Sequence[int]]) -> list[int]:
    """Consensus ranking by Bradley–Terry strengths fitted to the pairwise wins of all rankings (one virtual tie
    per pair keeps them finite; see ``evaluation.bradley_terry``); strengths equal to 1e-9 tie."""
    from lightning_rlhf.evaluation.ratings import bradley_terry

    theta = bradley_terry(win_counts(rankings))
    return rank([round(float(t), 9) for t in theta])


CONSENSUS = {"borda": borda, "bradley-terry": bradley_terry_consensus}


def agreement_report(labels: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Agreement between labellers who ranked the same item, overall and per labeller.

    Args:
        labels: records with ``item``, ``labeller`` and ``ranks``, at most one per (item, labeller).

    Returns:
        ``pairwise_agreement``: agreed / compared response pairs, pooled over every item and every two labellers
        of it; ``kendall_tau``: the mean τ-b over those (item, two labellers); ``per_labeller``: the same over the
        pairs that include that labeller, with their number of ``labels``. ``None`` where no item has two labellers.
    """
    by_item: dict[Any, dict[str, Sequence[int]]] = defaultdict(dict)
    for label in labels:
        by_item[label["item"]][label["labeller"]] = label["ranks"]
    totals: dict[str | None, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0])  # agreed, compared, Σ τ, n τ
    for rankings in by_item.values():
        for first, second in combinations(sorted(rankings), 2):
            agreed, compared = pairwise_agreement(rankings[first], rankings[second])
            tau = kendall_tau(rankings[first], rankings[second])
            for who in (None, first, second):  # None: overall
                total = totals[who]
                total[0], total[1] = total[0] + agreed, total[1] + compared
                if not math.isnan(tau):
                    total[2], total[3] = total[2] + tau, total[3] + 1

    def summary(who: str | None) -> dict[str, float | None]:
        agreed, compared, tau_sum, tau_count = totals.get(who, [0, 0, 0.0, 0])
        return {
            "pairwise_agreement": agreed / compared if compared else None,
            "kendall_tau": tau_sum / tau_count if tau_count else None,
        }

    counts: dict[str, int] = defaultdict(int)
    for label in labels:
        counts[label["labeller"]] += 1
    return {
        "items": len(by_item),
        "labels": len(labels),
        "items_with_several_labellers": sum(len(r) > 1 for r in by_item.values()),
        **summary(None),
        "per_labeller": {who: {"labels": counts[who], **summary(who)} for who in sorted(counts)},
    }
