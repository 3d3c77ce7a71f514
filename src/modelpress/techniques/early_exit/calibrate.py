"""Exit thresholds calibrated on held-out data to a target accuracy (BranchyNet's tuning).

Greedy, exit by exit in forward order: for exit ``i`` take the loosest threshold such that the
whole cascade's accuracy on the validation split -- earlier exits with their chosen
thresholds, exit ``i`` with the candidate, every remaining sample going to the final output --
stays at or above the target. Each step keeps the cascade at or above the target (exit ``i``
disabled is the previous cascade), so the result meets the target on the validation split by
construction whenever the final output alone does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from modelpress.context import batch_inputs
from modelpress.errors import DataError
from modelpress.techniques.early_exit.heads import confidence, to_confidence
from modelpress.techniques.early_exit.model import EarlyExitModel, exit_outputs


def loosest_cut(scores: Tensor, gain: Tensor, deficit: int) -> int:
    """How many of the most confident samples may leave at one exit.

    Exiting the ``k`` most confident samples changes the cascade's correct count by
    ``sum_{j<k} gain_j`` (``gain = correct at this exit - correct at the final output``); a cut
    must not split tied scores.

    Args:
        scores: ``(m,)`` confidence scores of the remaining samples, sorted descending.
        gain: ``(m,)`` per-sample change of the correct count (-1, 0 or 1), in the same order.
        deficit: the smallest allowed total change (``needed - current`` correct count).

    Returns:
        The largest valid ``k`` in ``[0, m]`` whose total change is ``>= deficit``; 0 when none
        is (the exit stays disabled).
    """
    m = int(scores.shape[0])
    totals = torch.cat([gain.new_zeros(1), gain.cumsum(0)])  # (m + 1,) change after k exits
    valid = torch.ones(m + 1, dtype=torch.bool)
    valid[1:m] = scores[:-1] > scores[1:]  # a cut between two different scores
    ok = (valid & (totals >= deficit)).nonzero()
    return int(ok.max()) if ok.numel() else 0


def cut_threshold(scores: Tensor, k: int) -> float | None:
    """A confidence threshold that lets exactly the first ``k`` of the sorted ``scores`` leave
    (``score >= threshold``): midway to the next score, so recomputed scores that differ in the
    last bits land on the same side. None for ``k = 0`` (exit disabled)."""
    if k == 0:
        return None
    a = scores[k - 1]
    if k == scores.shape[0]:  # every remaining sample leaves
        return float(a - 1e-4 * max(1.0, abs(float(a))))
    b = scores[k]
    mid = (a + b) / 2  # same dtype as the scores, so the comparison is exact
    return float(mid if mid > b else a)


def greedy_thresholds(
    scores: Tensor, correct: Tensor, needed: int
) -> tuple[list[float | None], Tensor]:
    """Choose one confidence threshold per exit, greedily in order, to keep the cascade's
    correct count ``>= needed`` (BranchyNet, Teerapittayanon et al. 2016, Sec. III-C).

    Args:
        scores: ``(E, N)`` confidence of each exit head on each sample (higher: surer).
        correct: ``(E + 1, N)`` bool, whether each exit (the final output last) is right.
        needed: the correct count the cascade must keep.

    Returns:
        The thresholds (None: exit disabled) and ``(N,)`` the exit each sample leaves at
        (``E`` for the final output).
    """
    n_exits, n = scores.shape
    exit_at = torch.full((n,), n_exits, dtype=torch.long)
    cols = torch.arange(n)
    chosen: list[float | None] = []
    for i in range(n_exits):
        current = int(correct[exit_at, cols].sum())
        rest = (exit_at == n_exits).nonzero().squeeze(1)  # samples still going to the end
        order = torch.argsort(scores[i, rest], descending=True, stable=True)
        rest = rest[order]
        s = scores[i, rest]
        gain = correct[i, rest].long() - correct[n_exits, rest].long()
        k = loosest_cut(s, gain, needed - current)
        chosen.append(cut_threshold(s, k))
        exit_at[rest[:k]] = i
    return chosen, exit_at


def cascade_summary(correct: Tensor, exit_at: Tensor) -> dict[str, Any]:
    """Accuracy of a cascade and where samples leave.

    Args:
        correct: ``(E + 1, N)`` bool, whether each exit is right on each sample.
        exit_at: ``(N,)`` the exit each sample leaves at.

    Returns:
        ``cascade_accuracy``, ``exit_fractions`` and ``exit_accuracy`` (of the samples leaving
        there; None where none does), and ``head_accuracy`` (each exit on every sample).
    """
    n_exits, n = correct.shape
    right = correct[exit_at, torch.arange(n)].double()
    counts = torch.bincount(exit_at, minlength=n_exits)
    hits = torch.bincount(exit_at, weights=right, minlength=n_exits)
    return {
        "cascade_accuracy": float(right.mean()),
        "exit_fractions": [round(float(c) / n, 6) for c in counts],
        "exit_accuracy": [
            round(float(h) / int(c), 6) if c else None for h, c in zip(hits, counts, strict=True)
        ],
        "head_accuracy": [round(float(a), 6) for a in correct.double().mean(1)],
    }


def calibrate(
    model: EarlyExitModel,
    loader: Iterable[Any],
    *,
    target_accuracy: float | None,
    max_accuracy_drop: float,
) -> dict[str, Any]:
    """Set ``model``'s thresholds from held-out data and report what they do there.

    Args:
        model: the early-exit model (changed: its thresholds).
        loader: held-out ``(inputs, labels)`` batches (the validation split).
        target_accuracy: the cascade accuracy to keep; None means the final output's
            accuracy on the loader minus ``max_accuracy_drop``.
        max_accuracy_drop: allowed drop below the final output's accuracy.

    Returns:
        ``thresholds``, ``target_accuracy``, ``target_met``, ``val_samples`` and the
        :func:`cascade_summary` of the chosen cascade on the loader.

    Raises:
        DataError: the loader is empty or unlabelled.
    """
    logits, labels = _collect(model, loader)
    correct = torch.stack([z.argmax(-1) == labels for z in logits])  # (E + 1, N)
    scores = torch.stack([confidence(z, model.criterion) for z in logits[:-1]])  # (E, N)
    n = int(labels.shape[0])
    final_accuracy = float(correct[-1].double().mean())
    target = target_accuracy if target_accuracy is not None else final_accuracy - max_accuracy_drop
    needed = math.ceil(target * n - 1e-6)
    chosen, exit_at = greedy_thresholds(scores, correct, needed)
    model.set_thresholds([None if t is None else to_confidence(t, model.criterion) for t in chosen])
    summary = cascade_summary(correct, exit_at)
    return {
        "thresholds": model.threshold_values(),
        "criterion": model.criterion,
        "target_accuracy": target,
        "target_met": int(correct[exit_at, torch.arange(n)].sum()) >= needed,
        "val_samples": n,
        **summary,
    }


def _collect(model: EarlyExitModel, loader: Iterable[Any]) -> tuple[list[Tensor], Tensor]:
    per_exit: list[list[Tensor]] = []
    labels: list[Tensor] = []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError("early_exit calibration needs labelled (inputs, labels) batches.")
        outs = exit_outputs(model, batch_inputs(batch))
        per_exit = per_exit or [[] for _ in outs]
        for bucket, z in zip(per_exit, outs, strict=True):
            bucket.append(z)
        labels.append(batch[1])
    if not labels:
        raise DataError("early_exit calibration: the validation split yields no batches.")
    return [torch.cat(b) for b in per_exit], torch.cat(labels)
