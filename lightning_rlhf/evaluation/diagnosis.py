"""What looks wrong in a pipeline run, stage by stage, from the numbers ``lightning-rlhf pipeline`` already collects.

``diagnose(summary)`` reads one run's ``summary.json`` (one seed): the judge's greedy and sampled scores of every
policy (``gold_greedy``, ``gold_sampled``) and of the demonstrations themselves (``demonstrations``' ``gold_mean``, on a
user's task), each reward model's pairwise agreement with the judge (``rm_pairwise_accuracy_vs_gold``) and the
training curves under ``curves`` (SFT's ``val_loss``; each RL run's
validation ``kl`` and training ``empty_fraction``). Each check is a small function in ``CHECKS``; each finding names
the stage, what was reached and what to try. Missing numbers are skipped, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    min_rm_agreement: float = 0.7
    """a reward model agreeing with the judge on fewer held-out pairs than this misleads RL (the toy's: 0.88)"""
    min_change: float = 0.005
    """judge-score changes against SFT smaller than this count as no change"""
    max_kl: float = 5.0
    """nats per response to the SFT model at the last validation (the toy's PPO ends at 1.1-1.4)"""
    max_empty_rise: float = 0.05
    """rise of the share of empty responses (EOS alone) from the first to the last logged rollout"""
    min_val_loss_drop: float = 0.01
    """SFT's validation loss falling by more than this fraction between its last two checks is still falling"""
    max_sft_gap: float = 0.1
    """SFT's greedy judge score this far below its demonstrations' own has not learnt what they show (Caesar example:
    0.617 and 0.601 on a validation-loss plateau, 0.90 once learnt, the demonstrations 0.90)"""
    min_val_loss_drop_from_start: float = 0.1
    """without a judge: SFT's best validation loss less than this fraction below its first check barely moved"""


Finding = tuple[str, str]  # (stage, what looks wrong and what to try)


def reward_model_agreement(summary: dict, limits: Thresholds) -> Iterator[Finding]:
    for name, entry in summary.items():
        accuracy = entry.get("rm_pairwise_accuracy_vs_gold") if isinstance(entry, dict) else None
        if accuracy is not None and accuracy < limits.min_rm_agreement:
            message = (
                f"agrees with the judge on {accuracy:.3f} of {entry.get('rm_eval_pairs', 0):.0f} held-out pairs "
                f"(< {limits.min_rm_agreement}): RL against it follows its mistakes; rank more prompts, lower the "
                "labeller's noise or train it longer"
            )
            yield name, message


def policy_against_sft(summary: dict, limits: Thresholds) -> Iterator[Finding]:
    sft = summary.get("sft")
    if not isinstance(sft, dict) or "gold_greedy" not in sft:
        return
    for name, entry in summary.items():
        if name == "sft" or not isinstance(entry, dict) or "gold_greedy" not in entry:
            continue
        greedy = entry["gold_greedy"] - sft["gold_greedy"]
        sampled = entry["gold_sampled"] - sft["gold_sampled"]
        change = f"greedy {greedy:+.3f}, sampled {sampled:+.3f} against SFT"
        if greedy < -limits.min_change and sampled > limits.min_change:
            message = (
                f"trades greedy quality for sampled ({change}): it sharpened the sampling distribution rather than "
                "improving its best answer; check the reward model's agreement, lower the learning rate or raise the "
                "KL coefficient"
            )
            yield name, message
        elif greedy < -limits.min_change and sampled < -limits.min_change:
            yield name, f"worse than SFT both ways ({change}): its reward does not follow the judge"


def kl_bound(summary: dict, limits: Thresholds) -> Iterator[Finding]:
    for name, curve in summary.get("curves", {}).items():
        kl = curve.get("kl")
        if kl and kl[-1] > limits.max_kl:
            message = (
                f"ends {kl[-1]:.2f} nats from the SFT model (> {limits.max_kl}): far from the reference the reward "
                "model is out of its data; raise kl_coef, set target_kl or stop earlier"
            )
            yield name, message


def empty_responses(summary: dict, limits: Thresholds) -> Iterator[Finding]:
    for name, curve in summary.get("curves", {}).items():
        empty = curve.get("empty_fraction")
        if empty and empty[-1] - empty[0] > limits.max_empty_rise:
            message = (
                f"empty responses rose from {empty[0]:.3f} to {empty[-1]:.3f} of the rollouts: the reward prefers "
                "saying nothing; give empty responses low scores in the comparisons or the judge"
            )
            yield name, message


def sft_still_learning(summary: dict, limits: Thresholds) -> Iterator[Finding]:
    loss = summary.get("curves", {}).get("sft", {}).get("val_loss", [])
    # Only when the last check is the best: after early stopping a last check can fall and still be past the best.
    if len(loss) >= 2 and loss[-1] == min(loss) and loss[-1] < loss[-2] * (1 - limits.min_val_loss_drop):
        message = (
            f"validation loss still falling at the end ({loss[-2]:.3f} -> {loss[-1]:.3f}): train it longer "
            "(trainer.max_steps) before the later stages start from it"
        )
        yield "sft", message


def sft_plateau_without_learning(summary: dict, limits: Thresholds) -> Iterator[Finding]:
    """SFT's validation loss stopped improving (its best check is not its last: early stopping fired, or the steps
    ran out past the best) while SFT has not learnt the task: the judge scores its greedy answers on held-out prompts
    well below its own demonstrations (``demonstrations``' ``gold_mean``), or, without a judge, its best validation
    loss barely fell from the first check."""
    loss = summary.get("curves", {}).get("sft", {}).get("val_loss", [])
    if len(loss) < 2 or min(loss) == loss[-1]:
        return  # still at its best at the end: sft_still_learning's case, not a plateau
    best = min(loss)
    plateau = f"its validation loss stopped improving at {best:.3f} (first check {loss[0]:.3f}, last {loss[-1]:.3f})"
    lower_lr = (
        "lower SFT's learning rate, e.g. to a third (lightning-rlhf pipeline --sft_lr; by hand sft.yaml's "
        "model.init_args.optimizer.init_args.lr) and give it more passes (--sft_passes); if it still plateaus, more "
        "demonstrations or a larger --model. On the Caesar example lr 3e-3 left seeds 1 and 2 on such a plateau "
        "(greedy 0.617, 0.601) and 3e-4 learnt the task on seeds 0-2 (0.889-0.928)"
    )
    reached = summary.get("sft", {}).get("gold_greedy")
    shown = summary.get("demonstrations", {}).get("gold_mean")
    if reached is not None and shown is not None:
        if shown - reached > limits.max_sft_gap:
            message = (
                f"{plateau} without learning the task: the judge gives its greedy answers {reached:.3f}, its own "
                f"demonstrations {shown:.3f}; {lower_lr}"
            )
            yield "sft", message
    elif best > loss[0] * (1 - limits.min_val_loss_drop_from_start):
        yield "sft", f"{plateau}, barely below where it started: it has learnt next to nothing; {lower_lr}"


CHECKS: tuple[Callable[[dict, Thresholds], Iterator[Finding]], ...] = (
    sft_still_learning,
    sft_plateau_without_learning,
    reward_model_agreement,
    policy_against_sft,
    kl_bound,
    empty_responses,
)


def diagnose(summary: dict, limits: Thresholds = Thresholds()) -> dict[str, list[str]]:
    """Findings per stage, in the order of ``CHECKS``; a stage with nothing wrong is absent."""
    findings: dict[str, list[str]] = {}
    for check in CHECKS:
        for stage, finding in check(summary, limits):
            findings.setdefault(stage, []).append(finding)
    return findings
