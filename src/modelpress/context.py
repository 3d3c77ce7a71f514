"""What the pipeline hands every technique: data, the teacher, the seed, a place to report.

A batch is ``(inputs, labels)`` for supervised data, a ``dict`` of keyword tensors for
Hugging Face models, or a bare input tensor. :func:`forward` runs a model on any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import DataError

if TYPE_CHECKING:
    from modelpress.data import DataBundle
    from modelpress.train import Callback

Batch = Any
Evaluate = Callable[[nn.Module], dict[str, float]]
LossFn = Callable[[Any, Batch], torch.Tensor]


def forward(model: nn.Module, batch: Batch) -> Any:
    """Run ``model`` on a batch of any supported form (tuple, dict or tensor)."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def batch_inputs(batch: Batch) -> Any:
    """The model inputs of a batch (drops labels)."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def classification_loss(outputs: Any, batch: Batch) -> torch.Tensor:
    """Cross-entropy of logits against the labels of a ``(inputs, labels)`` batch."""
    if isinstance(batch, dict) and "labels" in batch:
        labels = batch["labels"]
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        labels = batch[1]
    else:
        raise DataError(
            "training needs labelled batches ((inputs, labels) or a dict with 'labels'); "
            "pass labelled data or a loss_fn."
        )
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    return F.cross_entropy(logits, labels)


@dataclass
class Context:
    """Everything a technique may use besides the model and its config.

    Attributes:
        data: a :class:`~modelpress.data.DataBundle`, when the data came as a spec.
        batches: any re-iterable of batches (e.g. a DataLoader), when given directly.
        example_inputs: one batch of inputs, for FLOPs and latency.
        teacher: the original model (frozen), or another teacher.
        original: the pipeline's input model, before any stage (never changed).
        evaluate: ``evaluate(model) -> {"accuracy": ...}`` on held-out data.
        seed: the run's seed; :meth:`generator` derives seeded generators from it.
        progress: show progress bars.
        loss_fn: the task loss used by ``train``.
        callbacks: training callbacks registered by earlier stages, consumed by ``train``.
        stage_index: the index of the stage running now.
        reports: what the running stage learned (per-layer sparsity, bits, ...).
    """

    data: DataBundle | None = None
    batches: Iterable[Batch] | None = None
    example_inputs: Any = None
    teacher: nn.Module | None = None
    original: nn.Module | None = None
    evaluate: Evaluate | None = None
    seed: int = 0
    progress: bool = False
    loss_fn: LossFn = classification_loss
    callbacks: list[Callback] = field(default_factory=list)
    stage_index: int = 0
    reports: dict[str, Any] = field(default_factory=dict)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A generator seeded from the run seed, the stage index and ``offset``."""
        return torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.stage_index * 101 + offset
        )

    def report(self, key: str, value: Any) -> None:
        """Record something the running stage learned; it lands in the stage's result."""
        self.reports[key] = value

    def has_data(self) -> bool:
        """Whether any training or calibration data was supplied."""
        return self.data is not None or self.batches is not None

    def training_batches(self, batch_size: int, epoch: int = 0) -> Iterable[Batch]:
        """Batches for one training epoch: shuffled and seeded when the data is a bundle.

        Raises:
            DataError: no data was supplied.
        """
        if self.data is not None:
            order_seed = (self.seed * 1_000_003 + self.stage_index * 10_007 + epoch) % 2**63
            return self.data.loader("train", batch_size, shuffle=True, seed=order_seed)
        if self.batches is not None:
            return self.batches
        raise DataError("this stage needs training data; pass data=... (e.g. --data digits).")

    def calibration_batches(self, n_samples: int, batch_size: int = 64) -> Iterator[Batch]:
        """Input batches holding about ``n_samples`` samples of training data, for calibration.

        Raises:
            DataError: no data was supplied.
        """
        if self.data is not None:
            x = self.data.calibration(n_samples, seed=self.seed)
            yield from x.split(batch_size)
            return
        if self.batches is None:
            raise DataError(
                "this stage needs calibration data; pass data=... (e.g. --data digits)."
            )
        seen = 0
        for batch in self.batches:
            yield batch_inputs(batch)
            seen += _batch_len(batch)
            if seen >= n_samples:
                return


def _batch_len(batch: Batch) -> int:
    inputs = batch_inputs(batch)
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    return int(inputs.shape[0])
