"""Evaluators: top-1 accuracy and sentence-embedding fidelity to a teacher.

The pipeline calls an ``Evaluator``, ``evaluate(model) -> dict[str, float]``; the
``*_evaluator`` factories bind the data once and return one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelpress.errors import DataError
from modelpress.measure.flops import call_model, eval_mode

__all__ = [
    "Evaluator",
    "accuracy",
    "accuracy_evaluator",
    "embedding_fidelity",
    "embeddings",
    "fidelity_evaluator",
]

Evaluator = Callable[[nn.Module], dict[str, float]]


def _logits(output: Any) -> Tensor:
    """Return the logits of a model output: a Tensor, or an object with ``.logits``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise DataError(
        f"accuracy needs the model to return a Tensor of logits or an object with .logits. "
        f"Got {type(output).__name__} instead."
    )


def accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy: ``acc = #{argmax(logits) == label} / #labels`` over the whole loader.

    The model runs in eval mode under ``torch.no_grad()``; each submodule's previous mode is
    restored afterwards.

    Args:
        model: A classifier returning logits ``(B, C)`` (or an output with ``.logits``).
        loader: Iterable of ``(inputs, labels)`` batches; ``inputs`` is a Tensor, a tuple or a
            dict of keyword tensors, ``labels`` is ``(B,)`` of class indices.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        DataError: If the loader is empty, a batch is not an ``(inputs, labels)`` pair, or the
            labels do not match the predictions' shape.
    """
    correct, total = 0, 0
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise DataError("accuracy expects the loader to yield (inputs, labels) pairs.")
            inputs, labels = batch
            predictions = _logits(call_model(model, inputs)).argmax(dim=-1)  # (B,)
            labels = torch.as_tensor(labels, device=predictions.device)
            if labels.shape != predictions.shape:
                raise DataError(
                    f"accuracy: labels of shape {tuple(labels.shape)} do not match predictions "
                    f"of shape {tuple(predictions.shape)}."
                )
            correct += int((predictions == labels).sum())
            total += labels.numel()
    if total == 0:
        raise DataError("accuracy: the loader yielded no labelled examples.")
    return correct / total


def embeddings(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Sentence embeddings of a Hugging Face encoder, the all-MiniLM-L6-v2 recipe.

    Mean pooling over real tokens, then L2 normalisation:
    ``e = normalize(sum_t m_t * h_t / max(sum_t m_t, 1e-9))`` with ``h = last_hidden_state``
    ``(B, T, H)`` and ``m = attention_mask`` ``(B, T)``. The model's mode and grad mode are
    left to the caller (so this also serves distillation losses).

    Args:
        model: An encoder returning an output with ``last_hidden_state`` (or a tuple whose
            first element is it).
        batch: Tokenized inputs, e.g. ``{"input_ids": ..., "attention_mask": ...}``; without an
            ``attention_mask`` every token counts.

    Returns:
        Unit-norm embeddings of shape ``(B, H)``.

    Raises:
        DataError: If ``batch`` is not a mapping or the output has no ``last_hidden_state``.
    """
    if not isinstance(batch, Mapping):
        raise DataError(
            f"embeddings expects a dict of tokenized tensors. Got {type(batch).__name__} instead."
        )
    output = model(**batch)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output:
        hidden = output[0]
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise DataError(
            "embeddings needs a model output with last_hidden_state of shape (B, T, H)."
        )
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    mask = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    summed = (hidden * mask).sum(dim=1)  # (B, H)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return F.normalize(summed / counts, p=2, dim=1)


def embedding_fidelity(
    student: nn.Module, teacher: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> float:
    """Mean cosine similarity of student and teacher sentence embeddings.

    ``fidelity = (1/N) * sum_i <e_s(x_i), e_t(x_i)>`` over all N sentences (embeddings are
    unit-norm, so the dot product is the cosine). Both models run in eval mode under
    ``torch.no_grad()`` and their modes are restored.

    Args:
        student: The compressed encoder.
        teacher: The reference encoder.
        batches: Iterable of tokenized batches (dicts of tensors).

    Returns:
        Mean cosine similarity in ``[-1, 1]`` (1.0 for identical models).

    Raises:
        DataError: If ``batches`` is empty or the embedding shapes differ.
    """
    cosine_sum, count = 0.0, 0
    with eval_mode(student), eval_mode(teacher), torch.no_grad():
        for batch in batches:
            e_student = embeddings(student, batch)  # (B, H)
            e_teacher = embeddings(teacher, batch)  # (B, H)
            if e_student.shape != e_teacher.shape:
                raise DataError(
                    f"embedding_fidelity: student embeddings {tuple(e_student.shape)} and teacher "
                    f"embeddings {tuple(e_teacher.shape)} differ in shape."
                )
            cosine_sum += float((e_student * e_teacher).sum())
            count += e_student.shape[0]
    if count == 0:
        raise DataError("embedding_fidelity: batches yielded no sentences.")
    return cosine_sum / count


def _reiterable(data: Iterable[Any]) -> Iterable[Any]:
    """Materialise one-shot iterators (generators) so an evaluator can be called repeatedly."""
    return list(data) if isinstance(data, Iterator) else data


def accuracy_evaluator(loader: Iterable[Any]) -> Evaluator:
    """Bind a loader into an evaluator ``model -> {"accuracy": accuracy(model, loader)}``.

    Args:
        loader: Iterable of ``(inputs, labels)`` batches (a one-shot iterator is materialised).

    Returns:
        An ``Evaluator``.
    """
    data = _reiterable(loader)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(model, data)}

    return evaluate


def fidelity_evaluator(teacher: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> Evaluator:
    """Bind a teacher and batches into ``model -> {"cosine": embedding_fidelity(...)}``.

    Args:
        teacher: The reference encoder.
        batches: Iterable of tokenized batches (a one-shot iterator is materialised).

    Returns:
        An ``Evaluator``.
    """
    data = _reiterable(batches)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"cosine": embedding_fidelity(model, teacher, data)}

    return evaluate
