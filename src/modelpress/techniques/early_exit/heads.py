"""Exit heads and exit criteria (BranchyNet, Teerapittayanon et al. 2016).

A head turns the features of one layer into class logits:

* 4-D features ``(B, C, H, W)``: adaptive average pool to ``pool x pool``, flatten;
* 3-D token features ``(B, T, C)``: mean over the tokens;
* 2-D features ``(B, C)``: as they are;

then an optional hidden ``Linear + ReLU`` and a ``Linear`` to the classes. A sample leaves at
an exit when the head is confident: its softmax entropy ``H(p) = -sum_k p_k log p_k`` is at
most ``tau`` (BranchyNet's criterion) or its largest softmax probability is at least ``tau``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Criterion = Literal["entropy", "max_prob"]
CRITERIA: tuple[str, ...] = ("entropy", "max_prob")


class ExitHead(nn.Module):
    """Pool (or average tokens), optional hidden ``Linear + ReLU``, then ``Linear`` to logits.

    Attributes:
        rank: the number of dimensions of the features it reads (2, 3 or 4).
        pool: the pooled side length for 4-D features.
    """

    def __init__(
        self, rank: int, channels: int, num_classes: int, pool: int = 2, hidden: int = 0
    ) -> None:
        super().__init__()
        self.rank, self.pool = rank, pool
        width = channels * pool * pool if rank == 4 else channels
        self.hidden = nn.Linear(width, hidden) if hidden else None
        self.fc = nn.Linear(hidden or width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` for features ``(B, C, H, W)``, ``(B, T, C)`` or ``(B, C)``."""
        if self.rank == 4:
            if x.shape[-1] != self.pool or x.shape[-2] != self.pool:
                x = F.adaptive_avg_pool2d(x, self.pool)  # (B, C, pool, pool)
            x = x.flatten(1)  # (B, C * pool * pool)
        elif self.rank == 3:
            x = x.mean(1)  # (B, C)
        if self.hidden is not None:
            x = torch.relu(self.hidden(x))  # (B, hidden)
        return self.fc(x)  # (B, num_classes)


def init_head(head: ExitHead, generator: torch.Generator) -> ExitHead:
    """Initialise every Linear of ``head`` like PyTorch's default (uniform in
    ``+-1/sqrt(fan_in)``, He et al. 2015 with ``a = sqrt(5)``), drawn from ``generator``."""
    with torch.no_grad():
        for layer in (head.hidden, head.fc):
            if layer is None:
                continue
            bound = 1.0 / math.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
    return head


def entropy(logits: Tensor) -> Tensor:
    """Softmax entropy per row, ``H(p) = -sum_k p_k log p_k`` in nats (BranchyNet's score).

    Computed as ``-sum_k softmax_k * log_softmax_k``: exact for tiny probabilities, and made
    of operators TorchScript and ONNX export (the exported cascade tests the same formula).

    Args:
        logits: ``(B, K)`` class logits.

    Returns:
        ``(B,)`` entropies in ``[0, log K]``.
    """
    return -(torch.softmax(logits, dim=-1) * torch.log_softmax(logits, dim=-1)).sum(-1)


def max_prob(logits: Tensor) -> Tensor:
    """The largest softmax probability per row, ``max_k p_k``.

    Args:
        logits: ``(B, K)`` class logits.

    Returns:
        ``(B,)`` probabilities in ``[1/K, 1]``.
    """
    return torch.softmax(logits, dim=-1).amax(-1)


def confidence(logits: Tensor, criterion: str) -> Tensor:
    """A score where higher means more confident: ``-H(p)`` (entropy) or ``max_k p_k``.

    Args:
        logits: ``(B, K)`` class logits.
        criterion: ``"entropy"`` or ``"max_prob"``.

    Returns:
        ``(B,)`` scores; a sample exits when its score is at least :func:`to_confidence` of
        the exit's threshold.
    """
    return -entropy(logits) if criterion == "entropy" else max_prob(logits)


def to_confidence(threshold: float, criterion: str) -> float:
    """The threshold in confidence units (``-tau`` for entropy, ``tau`` for max_prob).

    The map is its own inverse, so it also turns a confidence threshold into ``tau``.
    """
    return -threshold if criterion == "entropy" else threshold


def disabled_threshold(criterion: str) -> float:
    """The stored threshold of an exit that never fires: ``-inf`` (entropy) or ``+inf``."""
    return -math.inf if criterion == "entropy" else math.inf


def exits_now(logits: Tensor, criterion: str, threshold: float) -> Tensor:
    """Which samples are confident enough to leave: ``H(p) <= tau`` or ``max_k p_k >= tau``.

    Args:
        logits: ``(B, K)`` logits of one exit head.
        criterion: ``"entropy"`` or ``"max_prob"``.
        threshold: the exit's ``tau``.

    Returns:
        ``(B,)`` bool.
    """
    if criterion == "entropy":
        return entropy(logits) <= threshold
    return max_prob(logits) >= threshold
